"""liveserve: serve online video LLMs that watch a stream and decide, frame by frame, when to speak.

The public API is imported lazily so `liveserve --help` does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Session": "liveserve.engine.live.session",
    "SessionError": "liveserve.engine.live.session",
    "SessionConfig": "liveserve.config",
    "CacheConfig": "liveserve.config",
    "CacheFullError": "liveserve.engine.kv_pool",
    "LiveModel": "liveserve.model.live",
    "load_model": "liveserve.model.loading",
    "CheckpointError": "liveserve.model.loading",
    "tiny_checkpoint": "liveserve.model.tiny",
    "write_tiny_checkpoint": "liveserve.model.tiny",
    "FrameDecision": "liveserve.engine.events",
    "ResponseStarted": "liveserve.engine.events",
    "ResponseDelta": "liveserve.engine.events",
    "ResponseDone": "liveserve.engine.events",
    "FramesDropped": "liveserve.engine.events",
    "SessionFailed": "liveserve.engine.events",
    "BatchEngine": "liveserve.engine.batch",
    "EngineConfig": "liveserve.config",
    "PoolConfig": "liveserve.config",
    "SchedulerConfig": "liveserve.config",
    "PerceptionConfig": "liveserve.config",
    "PoolFullError": "liveserve.engine.kv_pool",
    "CommentarySession": "liveserve.engine.commentary.session",
    "CommentaryConfig": "liveserve.config",
    "ChunkDone": "liveserve.engine.events",
    "QwenVLModel": "liveserve.model.qwen_vl",
    "tiny_commentary_checkpoint": "liveserve.model.tiny",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'liveserve' has no attribute {name!r}")
