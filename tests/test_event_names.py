"""One name per event from the engine to the client: docs/architecture.md's "Event names" table names
what exists in each layer, and every event the services send has a handler at the gateway."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.engine import events as engine
from liveserve.internal.v2 import decision_pb2 as dpb
from liveserve.internal.v2 import reaction_pb2 as rpb
from liveserve.services.gateway.session.event_relay import EventRelay
from liveserve.services.wire import contracts as c

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
WIRE_EVENTS = set(typing.get_args(c.DecisionEvent)) | set(typing.get_args(c.ReactionEvent))


def _table() -> list[list[list[str]]]:
    """The table's rows: per column, the names in backticks (none where the layer has no such event)."""
    section = DOC.read_text().split("### Event names", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # past the header and its rule
    return [[re.findall(r"`(\w+)`", cell) for cell in row.strip("|").split("|")] for row in rows]


def _exists(name: str, column: int) -> bool:
    layers = [(engine,), (c,), (dpb, rpb), (pb,)][column]
    return any(hasattr(module, name) for module in layers)


def test_the_event_names_table_names_what_each_layer_has():
    rows = _table()
    assert len(rows) >= len(WIRE_EVENTS)
    for row in rows:
        assert len(row) == 4, row
        for column, names in enumerate(row):
            for name in names:
                assert _exists(name, column), f"{name} (column {column + 1} of the Event names table) does not exist"


def test_the_table_covers_every_event_and_the_wire_names_agree():
    rows = _table()
    assert {name for row in rows for name in row[1]} >= {cls.__name__ for cls in WIRE_EVENTS}
    assert {name for row in rows for name in row[0]} >= {cls.__name__ for cls in typing.get_args(engine.Event)}
    for _, wire, internal, _public in rows:
        assert wire[:1] == internal[:1], f"the contract and the internal proto call one event {wire} and {internal}"


def test_every_wire_event_has_a_handler_at_the_gateway():
    assert set(EventRelay.FROM_DECISION) == set(typing.get_args(c.DecisionEvent))
    assert set(EventRelay.FROM_REACTION) == set(typing.get_args(c.ReactionEvent))
    assert all(callable(handler) for handler in [*EventRelay.FROM_DECISION.values(),
                                                 *EventRelay.FROM_REACTION.values()])
