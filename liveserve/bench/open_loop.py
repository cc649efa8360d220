"""One level of the capacity benchmark's open loop: N real-time streams with staggered phases, a decision
bias that makes random weights fire at a realistic rate, the frames they send, and the memory they use
(capacity.py runs the levels and writes the report).
"""

from __future__ import annotations

import heapq
import math
import resource
import time
from typing import Callable

import torch

from liveserve.bench.capacity_settings import CapacitySettings
from liveserve.bench.common import percentile, sync
from liveserve.bench.single_stream import single_pool
from liveserve.config import CacheConfig, CommentaryConfig, EngineConfig, SchedulerConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import ChunkDone, FrameDecision, FramesDropped, ReplyRequested, SessionFailed
from liveserve.engine.kv_pool import PoolFullError
from liveserve.model.live import LiveModel

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
        engine = BatchEngine(self.model, EngineConfig(pool=single_pool(self.model, len(frames)),
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


