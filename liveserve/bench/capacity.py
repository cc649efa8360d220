"""Capacity benchmark: how many real-time streams one model replica decides within a latency SLO.

Open loop, real time: at each level N, N streams send frames at `fps`, their phases staggered evenly over
one frame period, for `duration_s`; frames arrive when they are due whether or not the engine keeps up.
A frame's latency is its due time -> its FrameDecision (so time a frame waits behind a busy step counts).
Sessions are Decision sessions (replies="external"), as in the disaggregated service: when one fires,
the bench plays the Reaction model and hands back a fixed reply `reply_delay_s` later, which the session
appends after its trigger and replays the frames decided meanwhile.

Random weights decide at random; a calibrated decision bias makes them behave like a narrator that is
mostly silent: on a short silent warm-up stream the bench measures each frame's margin
log P(interval) - log P(rest) and sets a logit bias on the interval token so that about `reply_rate`
of those frames fall below the streaming threshold (they fire); the bias then stays fixed for the run,
and the measured share of frames that fired is reported.

Before a level is timed every session is brought to a steady-state cache (`prefill_frames` frames, fed
in lockstep and not measured), so attention runs over the cache length a long-running stream has.

A level passes when its p99 is within `slo_ms` and no frame was dropped, left undecided or failed;
`capacity` is the largest passing N. In the same run a single stream (inline replies, full cache,
frame by frame) goes through the engine and through a reference-style loop the bench carries: one
Hugging Face DynamicCache, one forward per frame, greedy replies, as VideoLLM-online's inference loop
does. Both make the same decisions on the same weights (reported: `decisions_match`), and
`single_stream_speedup` is the ratio of their frames/s.

A commentary model (Qwen2.5-VL family) runs its own mode: each stream's frames make chunks (`chunk_s * fps`
frames), a chunk's latency is its last frame's due time -> its turn's last token (its frames count as
decided then), and its turns say `max_tokens_per_chunk` tokens where the random model does not stop
earlier (no bias is calibrated: the model's own choices, a worst case for a narrator that is often
silent). Frames are pixels. There is no single-stream reference loop for this family here:
`single_stream_speedup` is null.
"""

from __future__ import annotations

import gc
import heapq
import inspect
import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from liveserve.bench.common import environment, percentile, sync, write_report
from liveserve.config import (DEFAULT_THRESHOLD, CacheConfig, CommentaryConfig, EngineConfig, PoolConfig,
                              SchedulerConfig, SessionConfig)
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import (ChunkDone, FrameDecision, FramesDropped, ReplyRequested, ResponseDone,
                                     SessionFailed)
from liveserve.engine.kernels import select_kernel
from liveserve.engine.kv_pool import KVPool, PoolFullError
from liveserve.engine.sessions import session_tokens
from liveserve.model.live import LiveModel

INPUTS = ("pixels", "features")
MAX_LEVELS = 16


@dataclass(frozen=True, slots=True)
class CapacitySettings:
    fps: float = 2.0
    duration_s: float = 8.0
    warmup_s: float = 1.0  # frames due in the first seconds of a level are not measured
    slo_ms: float = 250.0
    input_kind: str = "features"
    reply_rate: float = 0.05  # share of frames that fire (calibrated, see module docs)
    reply_tokens: int = 16  # length of the reply the bench hands back
    reply_delay_s: float = 1.0  # how long the simulated Reaction model takes to write it
    prefill_frames: int = 64
    window_frames: int = 64
    single_stream_frames: int = 64
    max_new_tokens: int = 8  # single-stream inline replies
    threshold: float = DEFAULT_THRESHOLD
    drain_s: float = 5.0  # after the last frame is due, how long undecided frames may still finish
    max_tokens_per_chunk: int = 20  # commentary models: most tokens a turn says
    cuda_graphs: bool = False  # the engine's steps replay CUDA graphs (EngineConfig.cuda_graphs), single stream too

    def __post_init__(self) -> None:
        if self.input_kind not in INPUTS:
            raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {self.input_kind!r}")
        if not (self.fps > 0 and self.duration_s > 0 and self.slo_ms > 0):
            raise ValueError("fps, duration and slo_ms must be > 0")
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"warmup_s must be in [0, duration_s), got {self.warmup_s}")
        if not 0.0 <= self.reply_rate < 1.0:
            raise ValueError(f"reply_rate must be in [0, 1), got {self.reply_rate}")
        if min(self.prefill_frames, self.single_stream_frames) < 0 or self.reply_tokens < 1:
            raise ValueError("prefill_frames and single_stream_frames must be >= 0, reply_tokens >= 1")


def sweep_levels(sweep_max: int) -> list[int]:
    """1, 2, 4, ... up to `sweep_max`, which is always the last level."""
    levels, n = [], 1
    while n < sweep_max:
        levels.append(n)
        n *= 2
    return levels + [sweep_max]


# ---- realistic decisions ----------------------------------------------------------------------------------

class DecisionBias:
    """A fixed logit bias on the interval token (a forward hook on the LM head), calibrated so that about
    `reply_rate` of a silent stream's frames fall below the threshold. Stateless: the same logits get the
    same bias on every path, so the engine and the reference loop decide alike."""

    def __init__(self, model: LiveModel) -> None:
        self.model, self.bias = model, 0.0
        self._handle = model.lm.lm_head.register_forward_hook(self._hook)
        self._margins: list[float] | None = None

    def _hook(self, _module, _inputs, output):
        interval = self.model.template.interval_id
        if self._margins is not None:  # calibrating: record log P(interval) - log P(anything else)
            rows = output.detach().float().reshape(-1, output.shape[-1])
            others = torch.cat([rows[:, :interval], rows[:, interval + 1:]], dim=1)
            self._margins += (rows[:, interval] - others.logsumexp(-1)).tolist()
        output[..., interval] += self.bias
        return output

    def calibrate(self, frames: list[torch.Tensor], reply_rate: float, threshold: float) -> float:
        """Feed `frames` (features or pixels, as the run will send) to one silent session and set the bias;
        returns it."""
        engine = BatchEngine(self.model, EngineConfig(pool=_single_pool(self.model, len(frames)),
                                                      scheduler=SchedulerConfig(max_lag_s=None)))
        engine.open("calibration", SessionConfig(threshold=0.0, replies="none"))
        self.bias, self._margins = 0.0, []
        try:
            for i, features in enumerate(frames):
                engine.push_frame("calibration", i * 0.5, features)
                engine.run_until_idle()
            margins = sorted(self._margins)
        finally:
            self._margins = None
            engine.shutdown()
        logit_threshold = math.log(threshold / (1.0 - threshold))
        if reply_rate <= 0:
            self.bias = logit_threshold - margins[0] + 20.0  # every frame clears the threshold by far
        else:
            # frames whose margin is below the reply_rate quantile fire; the cut sits halfway between two
            # measured margins so no calibration frame sits on the threshold
            k = max(1, min(len(margins) - 1, round(reply_rate * len(margins))))
            self.bias = logit_threshold - (margins[k - 1] + margins[k]) / 2
        return self.bias

    def remove(self) -> None:
        self._handle.remove()


# ---- frames -----------------------------------------------------------------------------------------------

def frame_source(model: LiveModel, kind: str, count: int = 16) -> Callable[[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if kind == "features":
        bank = [torch.randn(model.layout.num_tokens, model.vision_hidden_size, generator=generator)
                .to(model.device) for _ in range(count)]
    else:
        size = model.frame_size
        bank = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator) for _ in range(count)]
    return lambda i: bank[i % len(bank)]


def _single_pool(model: LiveModel, frames: int, reply_tokens: int = 0) -> PoolConfig:
    """A pool for one full-cache session of `frames` frames (and replies), with room for block rounding."""
    tokens = (frames + 8) * (model.layout.num_tokens + 1) + reply_tokens + 2048
    return PoolConfig(budget_tokens=tokens + 64, max_session_tokens=tokens)


# ---- memory -----------------------------------------------------------------------------------------------

def memory_now(device: torch.device) -> dict:
    """GPU memory (allocated now, peak since the last reset, reserved) on CUDA; resident set size on CPU."""
    if device.type == "cuda":
        return {"kind": "gpu", "allocated_bytes": torch.cuda.memory_allocated(device),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.memory_reserved(device)}
    rss = 0
    try:
        with open("/proc/self/status") as status:
            rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"kind": "rss", "rss_bytes": rss, "peak_rss_bytes": peak}


# ---- one level of the open loop ---------------------------------------------------------------------------

def _prefill(engine: BatchEngine, ids: list[str], frames: int, features: Callable[[int], torch.Tensor],
             fps: float) -> str | None:
    """Bring every session's cache to steady state: `frames` frames each, fed in lockstep, unmeasured.
    Returns why a session failed meanwhile (e.g. the device ran out of memory), None when none did."""
    for j in range(frames):
        for k, sid in enumerate(ids):
            engine.session(sid).push_frame(j / fps, features(j + k))
        engine.wake()
        for sid, event in engine.run_until_idle(timeout_s=600):
            if isinstance(event, ReplyRequested):
                engine.push_reply(sid, "", ())  # no replies while filling: the caches hold frames
            elif isinstance(event, SessionFailed):
                return f"session {sid} failed while filling its cache: {event.message}"
    return None


def level_config(model: LiveModel, settings: CapacitySettings) -> SessionConfig:
    """A level's sessions: Decision sessions with a sink_window cache, or a commentary model's own mode."""
    if model.family != "live":
        return SessionConfig(mode="commentary", commentary=CommentaryConfig(
            fps=settings.fps, max_tokens_per_chunk=settings.max_tokens_per_chunk))
    return SessionConfig(threshold=settings.threshold, replies="external",
                         cache=CacheConfig(policy="sink_window", window_frames=settings.window_frames,
                                           evict_frames=min(8, settings.window_frames)))


def run_level(engine: BatchEngine, n: int, settings: CapacitySettings, frame: Callable[[int], torch.Tensor],
              features: Callable[[int], torch.Tensor], reply_ids: tuple[int, ...], reply_text: str) -> dict:
    model = engine.model
    config = level_config(model, settings)
    ids = [f"n{n}-s{k}" for k in range(n)]
    opened: list[str] = []
    result: dict = {"sessions": n}
    try:
        for sid in ids:
            engine.open(sid, config)
            opened.append(sid)
    except PoolFullError as exc:
        for sid in opened:
            engine.close(sid)
        return {**result, "admitted": len(opened), "meets_slo": False, "refused": str(exc)}
    try:
        failure = _prefill(engine, ids, settings.prefill_frames, features, settings.fps)
        if failure is not None:
            return {**result, "admitted": n, "meets_slo": False, "failed": failure}
        sync(model.device)
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        result.update(_open_loop(engine, ids, settings, frame, reply_ids, reply_text))
    finally:
        for sid in ids:
            engine.close(sid)
    result["memory"] = memory_now(model.device)
    return result


def _open_loop(engine: BatchEngine, ids: list[str], settings: CapacitySettings, frame: Callable[[int], torch.Tensor],
               reply_ids: tuple[int, ...], reply_text: str) -> dict:
    n, period = len(ids), 1.0 / settings.fps
    frames_per_stream = max(1, int(settings.duration_s * settings.fps))
    offset = settings.prefill_frames  # stream time goes on from the prefill
    start = time.monotonic() + 0.05
    measured_from = start + settings.warmup_s
    arrivals = [(start + k * period / n, k, 0) for k in range(n)]  # (due, stream, frame number)
    heapq.heapify(arrivals)
    replies: list[tuple[float, str]] = []  # (due, session): the simulated Reaction's answers
    due: dict[tuple[str, int], float] = {}
    latencies: list[float] = []
    counts = dict(due=0, decided=0, dropped=0, fired=0, steps=0, batch_sessions=0)
    failed: set[str] = set()  # sessions the engine failed (e.g. a forward ran out of device memory)
    last_due = start + (frames_per_stream - 1) * period + period
    deadline = last_due + settings.drain_s
    while time.monotonic() < deadline:
        now = time.monotonic()
        while arrivals and arrivals[0][0] <= now:
            at, k, j = heapq.heappop(arrivals)
            sid, frame_id = ids[k], offset + j
            due[(sid, frame_id)] = at  # a failed session's frames stay here: they count as undecided
            if sid not in failed:
                engine.push_frame(sid, frame_id * period, frame(frame_id + k), frame_id=frame_id)
            counts["due"] += at >= measured_from
            if j + 1 < frames_per_stream:
                heapq.heappush(arrivals, (at + period, k, j + 1))
        while replies and replies[0][0] <= now:
            _, sid = heapq.heappop(replies)
            if sid not in failed:
                engine.push_reply(sid, reply_text, reply_ids)
        if engine.has_work():
            events = engine.step()
            sync(engine.model.device)
            done = time.monotonic()
            counts["steps"] += 1
            counts["batch_sessions"] += len(engine.last_batch)
            for sid, event in events:
                if isinstance(event, FrameDecision):
                    at = due.pop((sid, event.frame_index), None)
                    if at is not None and at >= measured_from:
                        latencies.append(done - at)
                        counts["decided"] += 1
                        counts["fired"] += event.fired
                    if event.fired:
                        heapq.heappush(replies, (done + settings.reply_delay_s, sid))
                elif isinstance(event, ChunkDone):  # commentary: the chunk's frames, from its last one's due time
                    times = [at for i in event.frame_ids if (at := due.pop((sid, i), None)) is not None]
                    measured = [at for at in times if at >= measured_from]
                    if measured:
                        latencies.append(done - max(times))
                        counts["decided"] += len(measured)
                        counts["fired"] += not event.silent
                elif isinstance(event, FramesDropped):
                    counts["dropped"] += sum(due.pop((sid, i), 0.0) >= measured_from for i in event.frame_ids)
                elif isinstance(event, SessionFailed):
                    failed.add(sid)
            continue
        if not arrivals and not replies and all(sid in failed for sid, _ in due):
            break
        wake = min([deadline] + [queue[0][0] for queue in (arrivals, replies) if queue])
        engine.wait_for_work(max(0.0, wake - time.monotonic()))
    undecided = sum(at >= measured_from for at in due.values())
    result = {
        "admitted": n, "frames_due": counts["due"], "frames_decided": counts["decided"],
        "dropped": counts["dropped"], "undecided": undecided, "failed_sessions": len(failed),
        "replies": counts["fired"], "reply_rate": counts["fired"] / counts["decided"] if counts["decided"] else 0.0,
        "steps": counts["steps"],
        "mean_batch_sessions": counts["batch_sessions"] / counts["steps"] if counts["steps"] else 0.0,
        "frames_per_s": counts["decided"] / (settings.duration_s - settings.warmup_s),
    }
    if latencies:
        result.update(p50_ms=percentile(latencies, 50) * 1e3, p99_ms=percentile(latencies, 99) * 1e3,
                      max_ms=max(latencies) * 1e3)
    result["meets_slo"] = bool(latencies) and result["p99_ms"] <= settings.slo_ms and not (
        counts["dropped"] or undecided or failed)
    return result


# ---- single stream: the engine against a reference-style loop -------------------------------------------

def _single_config(settings: CapacitySettings) -> SessionConfig:
    return SessionConfig(threshold=settings.threshold, max_new_tokens=settings.max_new_tokens,
                         cache=CacheConfig(policy="full"))


def engine_single_stream(model: LiveModel, frames: list[torch.Tensor], settings: CapacitySettings) -> tuple:
    """(decisions [(p_silent, fired)], reply token counts, seconds): one session through the BatchEngine,
    each frame decided (and its reply written) before the next arrives."""
    pool = _single_pool(model, len(frames), len(frames) * (settings.max_new_tokens + 8))
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


# ---- the run ----------------------------------------------------------------------------------------------

def _level_line(level: dict) -> str:
    if "refused" in level:
        return f"  {level['sessions']} streams: refused after {level['admitted']} ({level['refused']})"
    if "failed" in level:
        return f"  {level['sessions']} streams: {level['failed']}"
    p = (f"p50 {level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms" if "p99_ms" in level else "no decisions")
    return (f"  {level['sessions']} streams: {p}, {level['dropped']} dropped, {level['undecided']} undecided, "
            f"{level['replies']} replies, {level['mean_batch_sessions']:.1f} sessions/step -> "
            f"{'meets' if level['meets_slo'] else 'misses'} the SLO")


def pool_config(model: LiveModel, settings: CapacitySettings, largest: int,
                memory_fraction: float | None) -> PoolConfig:
    """On CUDA the serving default (a fraction of the memory left after the weights); on CPU room for the
    largest level (host memory is shared, so no fraction of it is taken)."""
    if model.device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # memory the allocator caches from the warm-up engines counts as free
        return PoolConfig(memory_fraction=memory_fraction or PoolConfig().memory_fraction)
    return PoolConfig(budget_tokens=largest * (session_tokens(model, level_config(model, settings)) + 16) + 16)


def run_capacity_bench(model: LiveModel, *, levels: list[int], settings: CapacitySettings, out: str,
                       preset: str | None = None, sweep: bool = False, refine: int = 1,
                       memory_fraction: float | None = None, attention: str = "auto") -> dict:
    """`levels`: session counts, ascending. `attention`: the engine's kernel (EngineConfig.attention). With `sweep`, stop at the first level that misses the SLO and
    then bisect up to `refine` more levels between the last pass and that miss."""
    commentary = model.family != "live"
    if settings.input_kind == "pixels" and model.vision is None:
        raise ValueError("this model has no vision tower; use --input features")
    if commentary and settings.input_kind != "pixels":
        raise ValueError("a commentary model encodes each chunk of frames itself: use --input pixels")
    # a kernel or CUDA graphs that cannot run here are refused now, not after the single-stream comparison
    select_kernel(attention, KVPool.for_model(model, PoolConfig(budget_tokens=64)))
    model.use_cuda_graphs(settings.cuda_graphs)
    frame = frame_source(model, "pixels") if settings.input_kind == "pixels" else None
    features = frame if commentary else frame_source(model, "features")
    frame = frame or features
    bias = None if commentary else DecisionBias(model)
    try:
        single, speedup = None, None
        if bias is None:
            print(f"liveserve bench capacity: {model.name} on {model.device}; commentary, up to "
                  f"{settings.max_tokens_per_chunk} tokens a chunk", file=sys.stderr, flush=True)
        else:
            calibration = max(16, min(64, round(2 / max(settings.reply_rate, 1e-3))))
            bias.calibrate([frame(i) for i in range(calibration)], settings.reply_rate, settings.threshold)
            print(f"liveserve bench capacity: {model.name} on {model.device}; interval logit bias {bias.bias:+.2f} "
                  f"for ~{settings.reply_rate:.0%} replies", file=sys.stderr, flush=True)
            single = single_stream(model, settings, frame)
            speedup = single["engine_frames_per_s"] / single["reference_frames_per_s"]
            print(f"  single stream: engine {single['engine_frames_per_s']:.1f} frames/s, reference loop "
                  f"{single['reference_frames_per_s']:.1f} frames/s ({speedup:.2f}x); decisions match: "
                  f"{single['decisions_match']}", file=sys.stderr, flush=True)
        engine = BatchEngine(model, EngineConfig(pool=pool_config(model, settings, max(levels), memory_fraction),
                                                 attention=attention, cuda_graphs=settings.cuda_graphs))
        forward = getattr(model, "forward_path", "hf")
        print(f"  attention kernel: {engine.kernel.name}; LM forward: {forward}", file=sys.stderr, flush=True)
        per_session = session_tokens(model, level_config(model, settings))
        pool = {"capacity_tokens": engine.pool.capacity_tokens, "bytes": engine.pool.nbytes,
                "bytes_per_token": engine.pool.bytes_per_token, "session_tokens": per_session,
                "sessions_admitted": engine.pool.sessions_admitted(per_session)}
        reply_ids = () if commentary else tuple(model.template.encode(" A red square appears.")[: settings.reply_tokens])
        reply_text = model.template.decode(reply_ids)
        results: list[dict] = []
        try:
            pending, passed, missed = list(levels), 0, None
            while pending and len(results) < MAX_LEVELS:
                n = pending.pop(0)
                print(f"liveserve bench capacity: {n} streams at {settings.fps:g} fps for {settings.duration_s:g}s "
                      f"({settings.input_kind})", file=sys.stderr, flush=True)
                level = run_level(engine, n, settings, frame, features, reply_ids, reply_text)
                results.append(level)
                print(_level_line(level), file=sys.stderr, flush=True)
                gc.collect()
                if level["meets_slo"]:
                    passed = max(passed, n)
                elif sweep:
                    missed = n if missed is None else min(missed, n)
                    pending = []
                if sweep and not pending and missed is not None and refine > 0 and missed - passed > 1:
                    refine -= 1
                    pending = [(passed + missed) // 2]
        finally:
            engine.shutdown()
    finally:
        if bias is not None:
            bias.remove()
    passing = [level["sessions"] for level in results if level["meets_slo"]]
    report = {"benchmark": "capacity", **environment(model), "preset": preset,
              "parameters": sum(p.numel() for p in model.parameters()), "input": settings.input_kind,
              "fps": settings.fps, "duration_s": settings.duration_s, "warmup_s": settings.warmup_s,
              "slo_ms": settings.slo_ms, "prefill_frames": settings.prefill_frames,
              "mode": "commentary" if commentary else "live",
              "cache": ({"policy": "commentary", "max_tokens_per_chunk": settings.max_tokens_per_chunk} if commentary
                        else {"policy": "sink_window", "window_frames": settings.window_frames}),
              "decision_bias": None if bias is None else {
                  "interval_logit_bias": bias.bias, "target_reply_rate": settings.reply_rate,
                  "threshold": settings.threshold, "reply_tokens": len(reply_ids),
                  "reply_delay_s": settings.reply_delay_s},
              "attention": engine.kernel.name, "forward": forward, "pool": pool, "levels": sorted(results, key=lambda level: level["sessions"]),
              "capacity": max(passing, default=0),
              # every level run passed: the capacity is at least this, the sweep just did not go higher
              "capacity_is_lower_bound": bool(results) and all(level["meets_slo"] for level in results),
              "single_stream": single, "single_stream_speedup": speedup}
    write_report(report, out)
    speed = "none (no reference loop for this family)" if speedup is None else f"{speedup:.2f}x"
    print(f"capacity: {report['capacity']} streams (p99 <= {settings.slo_ms:g} ms, no drops); single_stream_speedup "
          f"{speed}", file=sys.stderr)
    return report
