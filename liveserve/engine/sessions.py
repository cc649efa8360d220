"""Which session runs a stream: the model family's, in the mode the session asks for.

LIVE models (liveserve.model.live) run `Session`: a streaming-EOS decision per frame. Qwen2.5-VL and Qwen2-VL
models (liveserve.model.qwen_vl, qwen2_vl) run `CommentarySession`: a turn per chunk of video. A mode the model's family
does not have is refused before anything is allocated. `FAMILIES` says what else the engine does for a
family: how its frames reach the vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from liveserve.config import SessionConfig
from liveserve.engine.inputs import SessionError


def _encode_chunks(model, sessions) -> None:
    from liveserve.engine.commentary.session import encode_chunks

    encode_chunks(model, sessions)


@dataclass(frozen=True, slots=True)
class Family:
    modes: tuple[str, ...]  # the first is the default
    # Its tower takes one frame at a time: pushed images go to the engine's BatchedFrameEncoder, batched
    # across sessions, and a frame is ready to step once encoded.
    encodes_pushed_frames: bool
    # Its tower takes what a session feeds next (a chunk of frames): for the sessions a step schedules, in
    # one call before they plan.
    encode_scheduled: Callable[[object, list], None] | None = None


_COMMENTARY = Family(("commentary",), encodes_pushed_frames=False, encode_scheduled=_encode_chunks)
FAMILIES = {"live": Family(("live",), encodes_pushed_frames=True), "qwen2_5_vl": _COMMENTARY, "qwen2_vl": _COMMENTARY}
MODES_BY_FAMILY = {name: family.modes for name, family in FAMILIES.items()}


def default_mode(model) -> str:
    return MODES_BY_FAMILY[model.family][0]


def check_mode(model, config: SessionConfig) -> None:
    modes = MODES_BY_FAMILY[model.family]
    if config.mode not in modes:
        raise SessionError(f"model {model.name or model.family!r} ({model.family}) serves mode "
                           f"{' or '.join(repr(m) for m in modes)}, not {config.mode!r}")


def session_tokens(model, config: SessionConfig) -> int:
    """The most KV tokens a session of `config` can hold: what a pool reserves for it."""
    check_mode(model, config)
    if config.mode == "commentary":
        from liveserve.engine.commentary.session import commentary_cache_limit

        return commentary_cache_limit(model, config)
    from liveserve.engine.live.session import cache_limit

    return cache_limit(model, config)


def new_session(model, config: SessionConfig, session_id: str = "", *, cache=None, encoder=None):
    check_mode(model, config)
    if config.mode == "commentary":
        from liveserve.engine.commentary.session import CommentarySession

        return CommentarySession(model, config, session_id, cache=cache)
    from liveserve.engine.live.session import Session

    return Session(model, config, session_id, cache=cache, encoder=encoder)


def tokens_per_frame(model, config: SessionConfig) -> int:
    """KV tokens a frame costs (what clients size their sessions by): a LIVE frame's slots and its interval
    token; in commentary mode the largest chunk's vision tokens per frame (its frames' pixel budget), rounded up."""
    if config.mode == "commentary":
        frames = config.commentary.frames_per_chunk
        return -(-model.largest_chunk_tokens(config.commentary) // frames)
    return model.layout.num_tokens + 1
