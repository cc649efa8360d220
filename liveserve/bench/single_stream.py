"""The capacity benchmark's single-stream comparison: one stream through the engine and through a
reference-style loop (one Hugging Face DynamicCache, one forward per frame, greedy replies, as
VideoLLM-online's inference loop does), with the same decisions on the same weights.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable

import torch

from liveserve.bench.capacity_settings import CapacitySettings
from liveserve.bench.common import sync
from liveserve.config import CacheConfig, EngineConfig, PoolConfig, SchedulerConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import FrameDecision, ResponseDone
from liveserve.model.live import LiveModel


def single_pool(model: LiveModel, frames: int, reply_tokens: int = 0) -> PoolConfig:
    """A pool for one full-cache session of `frames` frames (and replies), with room for block rounding."""
    tokens = (frames + 8) * (model.layout.num_tokens + 1) + reply_tokens + 2048
    return PoolConfig(budget_tokens=tokens + 64, max_session_tokens=tokens)



# ---- single stream: the engine against a reference-style loop -------------------------------------------

def _single_config(settings: CapacitySettings) -> SessionConfig:
    return SessionConfig(threshold=settings.threshold, max_new_tokens=settings.max_new_tokens,
                         cache=CacheConfig(policy="full"))


def engine_single_stream(model: LiveModel, frames: list[torch.Tensor], settings: CapacitySettings) -> tuple:
    """(decisions [(p_silent, fired)], reply token counts, seconds): one session through the BatchEngine,
    each frame decided (and its reply written) before the next arrives."""
    pool = single_pool(model, len(frames), len(frames) * (settings.max_new_tokens + 8))
    engine = BatchEngine(model, EngineConfig(pool=pool, scheduler=SchedulerConfig(max_lag_s=None),
                                             cuda_graphs=settings.cuda_graphs))
    engine.open("single", _single_config(settings))
    decisions, replies = [], []
    try:
        sync(model.device)
        started = time.perf_counter()
        for i, item in enumerate(frames):
            engine.push_frame("single", i * 0.5, item)
            for _, event in engine.run_until_idle(timeout_s=600):
                if isinstance(event, FrameDecision):
                    decisions.append((event.p_silent, event.fired))
                elif isinstance(event, ResponseDone):
                    replies.append(event.num_tokens)
        sync(model.device)
        seconds = time.perf_counter() - started
    finally:
        engine.shutdown()
    return decisions, replies, seconds


@torch.inference_mode()
def reference_single_stream(model: LiveModel, frames: list[torch.Tensor], settings: CapacitySettings) -> tuple:
    """The same stream through a VideoLLM-online-style loop: one DynamicCache, one forward per frame over
    [pending tokens + the frame's embeddings], greedy replies token by token. Same return as the engine's."""
    from transformers import DynamicCache

    template, lm = model.template, model.lm
    interval, eos = template.interval_id, template.eos_id
    cache = DynamicCache(config=lm.config)
    # newer transformers name the argument `cache`, older ones `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"

    def last_logits(embeds: torch.Tensor) -> torch.Tensor:
        # the LM head on the last position only, as the engine does (a strided view into the head is slow on
        # some CPU kernels, which would flatter the engine)
        out = lm.model(inputs_embeds=embeds[None], use_cache=True, **{cache_arg: cache})
        return lm.lm_head(out.last_hidden_state[0, -1:])[0].float()

    pending = template.start_ids(model.system_prompt)
    decisions, replies = [], []
    sync(model.device)
    started = time.perf_counter()
    for item in frames:
        features = item if item.is_floating_point() else model.encode_frames(item[None])[0]
        embeds = torch.cat([model.embed_ids(pending), model.embed_frames(features[None])])
        probs = last_logits(embeds).softmax(-1)
        p_silent = float(probs[interval])
        if p_silent < settings.threshold:
            probs[interval] = 0.0
        token = int(probs.argmax())
        decisions.append((p_silent, token != interval))
        if token == interval:
            pending = [interval]
            continue
        reply = [int(last_logits(model.embed_ids(list(template.stream_reply_ids))).argmax())]
        while reply[-1] != eos and len(reply) < settings.max_new_tokens:
            reply.append(int(last_logits(model.embed_ids(reply[-1:])).argmax()))
        replies.append(len(reply))
        pending = ([eos] if reply[-1] == eos else [reply[-1], eos]) + list(template.stream_open_ids)
    sync(model.device)
    return decisions, replies, time.perf_counter() - started


def single_stream(model: LiveModel, settings: CapacitySettings, frame: Callable[[int], torch.Tensor]) -> dict:
    frames = [frame(i) for i in range(settings.single_stream_frames)]
    # a full unmeasured pass of each first: the reply path, the allocator and lazy imports warm up too
    engine_single_stream(model, frames, settings)
    reference_single_stream(model, frames, settings)
    engine_decisions, engine_replies, engine_s = engine_single_stream(model, frames, settings)
    reference_decisions, reference_replies, reference_s = reference_single_stream(model, frames, settings)
    fired = [f for _, f in engine_decisions]
    gap = max((abs(p - q) for (p, _), (q, _) in zip(engine_decisions, reference_decisions)), default=0.0)
    return {"frames": len(frames), "engine_frames_per_s": len(frames) / engine_s,
            "reference_frames_per_s": len(frames) / reference_s, "replies": sum(fired),
            "reply_tokens": sum(engine_replies),
            "decisions_match": fired == [f for _, f in reference_decisions] and engine_replies == reference_replies,
            "max_p_silent_gap": gap}


