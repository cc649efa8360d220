"""The engine's contracts (engine/contracts.py) hold structurally: both session classes have every member
of EngineSession and both model families every member of EngineModel, with compatible signatures; and
every kind of planned work (planned.Work) has exactly one handler."""

from __future__ import annotations

import inspect

import pytest

from liveserve.config import SessionConfig
from liveserve.engine.commentary.session import CommentarySession
from liveserve.engine.contracts import EngineModel, EngineSession, SplitReplies
from liveserve.engine.live.planned import Work
from liveserve.engine.live.session import REPLY_ROLES, Session

EMPTY = inspect.Parameter.empty


def declared(protocol) -> dict[str, object]:
    """A Protocol's members: name -> its function (a method), its property, or None (a field)."""
    members: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if not getattr(klass, "_is_protocol", False) or klass.__name__ in ("Protocol", "Generic"):
            continue
        members.update({name: None for name in getattr(klass, "__annotations__", {})})
        members.update({name: value for name, value in vars(klass).items()
                        if not name.startswith("_") and (callable(value) or isinstance(value, property))})
    return members


def signature_problems(where: str, wanted, found) -> list[str]:
    """`found` accepts every call the contract's `wanted` allows: the same parameters, in order and of the
    same kinds, optional where the contract's are; anything more has a default."""
    want = list(inspect.signature(wanted).parameters.values())
    have = list(inspect.signature(found).parameters.values())
    problems = []
    for index, parameter in enumerate(want):
        match = next((p for p in have if p.name == parameter.name), None)
        if match is None:
            problems.append(f"{where} has no parameter {parameter.name}")
        elif match.kind != parameter.kind or index < len(have) and have[index].name != parameter.name:
            problems.append(f"{where}: parameter {parameter.name} is not where the contract has it")
        elif parameter.default is not EMPTY and match.default is EMPTY:
            problems.append(f"{where} requires {parameter.name}, which the contract makes optional")
    names = {p.name for p in want}
    for extra in have:
        if extra.name not in names and extra.default is EMPTY and extra.kind not in (extra.VAR_POSITIONAL,
                                                                                   extra.VAR_KEYWORD):
            problems.append(f"{where} requires {extra.name}, which the contract does not pass")
    return problems


def contract_problems(protocol, instance) -> list[str]:
    cls, problems = type(instance), []
    for name, member in declared(protocol).items():
        where = f"{cls.__name__}.{name}"
        found = inspect.getattr_static(cls, name, None)
        if member is None or isinstance(member, property):
            if found is None and not hasattr(instance, name):
                problems.append(f"{cls.__name__} has no {name}")
            elif isinstance(member, property) and callable(found) and not isinstance(found, property):
                problems.append(f"{where} is a method, the contract reads it as a value")
        elif found is None:
            problems.append(f"{cls.__name__} has no method {name}")
        elif not callable(found) or isinstance(found, property):
            problems.append(f"{where} is not a method")
        else:
            problems += signature_problems(where, member, found)
    return problems


@pytest.fixture(scope="module")
def sessions(tiny_model, qwen):
    live, commentary = Session(tiny_model), CommentarySession(qwen, SessionConfig(mode="commentary"))
    yield live, commentary
    live.close()
    commentary.close()


def test_both_session_classes_keep_the_engine_session_contract(sessions):
    for session in sessions:
        assert contract_problems(EngineSession, session) == []


def test_both_model_families_keep_the_engine_model_contract(tiny_model, qwen):
    for model in (tiny_model, qwen):
        assert contract_problems(EngineModel, model) == []


def test_only_live_sessions_take_replies_written_elsewhere(sessions):
    live, commentary = sessions
    assert contract_problems(SplitReplies, live) == [] and isinstance(live, SplitReplies)
    assert not isinstance(commentary, SplitReplies)


def test_the_check_catches_a_missing_member_and_an_incompatible_signature(sessions):
    class Drifted:
        session_id, cache, closed, backlog = "", None, False, 0

        def plan(self, budget):  # a parameter the engine does not pass
            return None

        def push_frame(self, frame, timestamp, frame_id=None):  # parameters swapped
            pass

        def push_query(self, timestamp, text, *, urgent):
            pass

        def drop_stale_frames(self, max_lag_s, max_queued):
            return []

    problems = contract_problems(EngineSession, Drifted())
    assert "Drifted.plan requires budget, which the contract does not pass" in problems
    assert "Drifted.push_frame: parameter timestamp is not where the contract has it" in problems
    assert "Drifted.push_query requires urgent, which the contract does not pass" in problems
    assert "Drifted has no method complete" in problems and "Drifted has no method has_work" in problems
    assert not any(problem.startswith("Drifted.drop_stale_frames") for problem in problems)


def test_every_kind_of_planned_work_has_exactly_one_handler(tiny_model):
    handlers: dict[Work, set[str]] = {work: set() for work in Work}
    for replies in REPLY_ROLES:
        session = Session(tiny_model, SessionConfig(replies=replies))
        # The session's frames, its reply role, its restore: each completes the kinds it plans.
        parts = [{Work.FRAME: session._complete_frame}, session._replies.completions(), session._restore.completions()]
        kinds = [work for part in parts for work in part]
        assert len(kinds) == len(set(kinds)) == len(session.completions), f"replies={replies}: a kind has two"
        assert session.completions == {work: handler for part in parts for work, handler in part.items()}
        assert len({handler.__func__ for handler in session.completions.values()}) == len(kinds)
        for work, handler in session.completions.items():
            handlers[work].add(handler.__func__.__qualname__)
        session.close()
    assert {work: len(names) for work, names in handlers.items()} == {work: 1 for work in Work}, handlers
