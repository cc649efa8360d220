"""Which session runs a stream: the model family's, in the mode the session asks for.

LIVE models (liveserve.model.live) run `Session`: a streaming-EOS decision per frame. Qwen2.5-VL models
(liveserve.model.qwen_vl) run `CommentarySession`: a turn per chunk of video. A mode the model's family
does not have is refused before anything is allocated.
"""

from __future__ import annotations

from liveserve.config import SessionConfig
from liveserve.engine.inputs import SessionError

MODES_BY_FAMILY = {"live": ("live",), "qwen2_5_vl": ("commentary",)}


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
        from liveserve.engine.commentary import commentary_cache_limit

        return commentary_cache_limit(model, config)
    from liveserve.engine.session import cache_limit

    return cache_limit(model, config)


def new_session(model, config: SessionConfig, session_id: str = "", *, cache=None, encoder=None):
    check_mode(model, config)
    if config.mode == "commentary":
        from liveserve.engine.commentary import CommentarySession

        return CommentarySession(model, config, session_id, cache=cache, encoder=encoder)
    from liveserve.engine.session import Session

    return Session(model, config, session_id, cache=cache, encoder=encoder)


def tokens_per_frame(model, config: SessionConfig) -> int:
    """KV tokens a frame costs (what clients size their sessions by): a LIVE frame's slots and its interval
    token; in commentary mode a chunk's vision tokens per frame, rounded up."""
    if config.mode == "commentary":
        frames = config.commentary.frames_per_chunk
        return -(-model.grid(frames).num_tokens // frames)
    return model.layout.num_tokens + 1
