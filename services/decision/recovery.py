"""What a session moving to another Decision replica is rebuilt from.

Two things survive the replica that held it: the session's turns in the registry (Redis), and the
decided frames its gateway kept (a ring as long as the cache window). `restore_items` merges them back
into stream order for `Session.restore`: each turn right after the frames up to its time, as the
original session took it, and the reply still being written (if any) last.
"""

from __future__ import annotations

from collections.abc import Sequence

from liveserve.engine.inputs import Restored, RestoredFrame, RestoredTurn
from liveserve.services.wire.contracts import Restore

TURNS_WITHOUT_FRAMES = 8  # a session restored with no frames (resumed elsewhere) gets its latest turns


def turns_from_history(history: Sequence[dict]) -> list[RestoredTurn]:
    """The registry's turns ({"t", "role", "text"}) as exchanges: a user turn with the reply at its time,
    or a reply alone (proactive). A query without a reply (it failed, or is still being written) left
    nothing in the cache and is not restored."""
    turns: list[RestoredTurn] = []
    query: dict | None = None
    for turn in history:
        if turn.get("role") == "user":
            query = turn
        elif turn.get("role") == "assistant" and turn.get("text"):
            asked = query is not None and query["t"] == turn["t"]
            turns.append(RestoredTurn(float(turn["t"]), query["text"] if asked else None, turn["text"]))
            query = None
    return turns


def restore_items(restore: Restore, history: Sequence[dict]) -> list[Restored]:
    frames = sorted(restore.frames, key=lambda frame: frame.frame_id)
    turns = turns_from_history(history)
    if frames:  # what the cache window held: the turns since its first frame
        turns = [turn for turn in turns if turn.timestamp >= frames[0].timestamp]
    else:
        turns = turns[-TURNS_WITHOUT_FRAMES:]
    items: list[Restored] = []
    pending = iter(turns)
    turn = next(pending, None)
    for frame in frames:
        while turn is not None and turn.timestamp < frame.timestamp:
            items.append(turn)
            turn = next(pending, None)
        items.append(RestoredFrame(frame.timestamp, frame.frame_id, frame.features))
    if turn is not None:
        items.append(turn)
    items.extend(pending)
    if restore.awaited is not None:
        items.append(restore.awaited)
    return items
