"""The engines on a CUDA device: same results as the CPU reference path, and the flash-attn, FlexAttention
and FlashInfer kernels as SDPA. Skipped without CUDA (and each library's test without its library)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine_helpers import frame_bank, steered
from liveserve.config import CacheConfig, SessionConfig
from liveserve.engine.events import FrameDecision
from liveserve.engine.live.session import Session
from liveserve.model.loading import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("policy", ["full", "sink_window"])
def test_cuda_session_matches_cpu(tiny_dir, policy):
    cpu = steered(load_model(tiny_dir, device="cpu", dtype=torch.float32), interval_bias=8.0, eos_bias=7.8)
    gpu = steered(load_model(tiny_dir, device="cuda", dtype=torch.float32), interval_bias=8.0, eos_bias=7.8)
    cache = CacheConfig(policy=policy, window_frames=4, evict_frames=2, text_window_tokens=16)
    results = []
    for model in (cpu, gpu):
        session = Session(model, SessionConfig(threshold=0.5, max_new_tokens=3, cache=cache))
        for i, features in enumerate(frame_bank(model, 20)):
            session.push_frame(i * 0.5, features)
        results.append([(e.p_silent, e.fired) for e in session.process() if isinstance(e, FrameDecision)])
    assert [f for _, f in results[0]] == [f for _, f in results[1]]
    for (p, _), (q, _) in zip(*results):
        assert p == pytest.approx(q, abs=1e-3)


def _batched_logits(model, kernel: str, sessions: int = 4, frames: int = 12, cuda_graphs: bool = False) -> torch.Tensor:
    from liveserve.config import EngineConfig, PoolConfig, SchedulerConfig
    from liveserve.engine.batch import BatchEngine

    engine = BatchEngine(model, EngineConfig(pool=PoolConfig(budget_tokens=50_000), attention=kernel,
                                             scheduler=SchedulerConfig(max_lag_s=None), cuda_graphs=cuda_graphs))
    config = SessionConfig(threshold=0.5, max_new_tokens=3,
                           cache=CacheConfig(policy="sink_window", window_frames=4, evict_frames=2))
    bank = frame_bank(model, frames)
    for k in range(sessions):
        engine.open(f"s{k}", config).trace = []
        for i in range(frames):
            engine.push_frame(f"s{k}", i * 0.5, bank[(i + k) % frames])
    engine.run_until_idle()
    logits = torch.cat([torch.stack([t.logits.float().cpu() for t in s.trace]) for s in engine.sessions])
    engine.shutdown()
    return logits


def test_cuda_batched_engine_matches_cpu(tiny_dir):
    cpu = steered(load_model(tiny_dir, device="cpu", dtype=torch.float32), interval_bias=8.0, eos_bias=7.8)
    gpu = steered(load_model(tiny_dir, device="cuda", dtype=torch.float32), interval_bias=8.0, eos_bias=7.8)
    torch.testing.assert_close(_batched_logits(gpu, "sdpa"), _batched_logits(cpu, "sdpa"), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_attention_kernel_matches_sdpa(tiny_dir):
    # bf16 noise could flip a near-threshold decision and change what follows: keep every frame silent.
    model = steered(load_model(tiny_dir, device="cuda", dtype=torch.bfloat16), interval_bias=100.0)
    torch.testing.assert_close(_batched_logits(model, "flash"), _batched_logits(model, "sdpa"), atol=5e-2, rtol=5e-2)


def test_flex_attention_kernel_matches_sdpa_on_cuda(tiny_dir):
    """FlexAttention compiled for CUDA, reading the pool in place, against the gathering SDPA path."""
    model = steered(load_model(tiny_dir, device="cuda", dtype=torch.bfloat16), interval_bias=100.0)
    torch.testing.assert_close(_batched_logits(model, "flex"), _batched_logits(model, "sdpa"), atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer-python (the gpu extra)")
def test_flashinfer_kernel_matches_sdpa():
    """FlashInfer's paged prefill over the pool in place, on a model with a head size its kernels take (64:
    the 1B preset), against the gathering SDPA path."""
    from liveserve.model.presets import build_preset_model

    model = steered(build_preset_model("llama3.2-1b-siglip", device="cuda"), interval_bias=100.0)
    got, want = _batched_logits(model, "flashinfer"), _batched_logits(model, "sdpa")
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()  # bf16, two kernels' summation orders


def test_auto_picks_flashinfer_where_it_runs():
    from liveserve.engine.kernels import select_kernel
    from liveserve.engine.kv_pool import KVPool

    pool = KVPool(num_layers=1, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, device="cuda", budget_tokens=64)
    expected = "flashinfer" if importlib.util.find_spec("flashinfer") else "flash" if importlib.util.find_spec(
        "flash_attn") else "sdpa"
    assert select_kernel("auto", pool).name == expected


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_a_step_synchronizes_with_the_device_once(tiny_dir, kernel):
    """Under CUDA's sync debug mode, a step of many sessions (frames, a reply prompt, reply tokens, an
    eviction) waits for the device exactly once: the readout's copy of every session's results."""
    import warnings

    from liveserve.config import EngineConfig, PoolConfig, SchedulerConfig
    from liveserve.engine.batch import BatchEngine

    model = steered(load_model(tiny_dir, device="cuda", dtype=torch.bfloat16), interval_bias=2.0)
    engine = BatchEngine(model, EngineConfig(pool=PoolConfig(budget_tokens=50_000), attention=kernel,
                                             scheduler=SchedulerConfig(max_lag_s=None)))
    config = SessionConfig(threshold=0.5, max_new_tokens=3,
                           cache=CacheConfig(policy="sink_window", window_frames=2, evict_frames=1))
    bank = [features.cuda() for features in frame_bank(model, 8)]  # as a local encoder leaves them
    for k in range(4):
        engine.open(f"s{k}", config)
    synced = []
    for i in range(8):
        for k in range(4):
            engine.push_frame(f"s{k}", i * 0.5, bank[(i + k) % 8])
        if i < 2:  # warm-up: flex compiles its kernel in the first steps
            engine.run_until_idle()
            continue
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        synced.append(sum("synchronizing" in str(w.message) for w in caught))
        engine.run_until_idle()
    engine.shutdown()
    assert synced == [1] * 6, synced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_of_the_direct_forward_match_it_run_eagerly(tiny_dir, dtype):
    """Real CUDA graphs of the direct forward's pieces (bucketed frame steps, reply prompts and tokens of
    four sessions sharing steps) against the same forward run eagerly."""
    # bf16: padded buckets may pick other GEMM kernels; keep every frame silent so no near-threshold
    # decision flips and changes what follows
    steer = dict(interval_bias=8.0, eos_bias=7.8) if dtype == torch.float32 else dict(interval_bias=100.0)
    model = steered(load_model(tiny_dir, device="cuda", dtype=dtype), **steer)
    eager = _batched_logits(model, "sdpa")
    graphed = _batched_logits(model, "sdpa", cuda_graphs=True)
    assert model.forward_path == "graphed" and len(model._graphed._graphs) >= 2
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(graphed, eager, atol=tolerance, rtol=tolerance)


def test_overlapping_perception_on_its_own_stream_matches_the_cpu(tiny_dir):
    """On CUDA frames are encoded on a thread and stream of their own while the LM steps: the decisions
    are the CPU reference's."""
    from liveserve.config import EngineConfig, PerceptionConfig, PoolConfig, SchedulerConfig
    from liveserve.engine.batch import BatchEngine

    frames = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(8)]
    decisions = []
    for device in ("cpu", "cuda"):
        model = steered(load_model(tiny_dir, device=device, dtype=torch.float32), interval_bias=8.0, eos_bias=7.8)
        engine = BatchEngine(model, EngineConfig(pool=PoolConfig(budget_tokens=20_000), perception=PerceptionConfig(),
                                                 scheduler=SchedulerConfig(max_lag_s=None)))
        assert engine.encoder.overlap == (device == "cuda")
        for k in range(3):
            engine.open(f"s{k}", SessionConfig(threshold=0.5, max_new_tokens=3))
            for i, frame in enumerate(frames):
                engine.push_frame(f"s{k}", i * 0.5, frame)
        events = engine.run_until_idle()
        decisions.append(sorted((sid, e.frame_index, e.fired) for sid, e in events if isinstance(e, FrameDecision)))
        engine.shutdown()
    assert decisions[0] == decisions[1]


def _commentary_logits(model, sessions: int = 3, frames: int = 12) -> torch.Tensor:
    from liveserve.config import CommentaryConfig, EngineConfig, PoolConfig, SchedulerConfig
    from liveserve.engine.batch import BatchEngine

    engine = BatchEngine(model, EngineConfig(pool=PoolConfig(budget_tokens=50_000),
                                             scheduler=SchedulerConfig(max_lag_s=None)))
    config = SessionConfig(mode="commentary", commentary=CommentaryConfig(
        max_tokens_per_chunk=4, vision_window_chunks=3, text_rounds=2, text_sink_tokens=4, text_window_tokens=6))
    g = torch.Generator().manual_seed(0)
    size = model.frame_size
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(frames)]
    for k in range(sessions):
        engine.open(f"s{k}", config).trace = []
        for i in range(frames):
            engine.push_frame(f"s{k}", i * 0.5, images[(i + k) % frames])
    engine.run_until_idle()
    logits = torch.cat([torch.stack([logits.float().cpu() for _, logits in s.trace]) for s in engine.sessions])
    engine.shutdown()
    return logits


def test_cuda_commentary_matches_cpu(qwen_dir):
    """Qwen2.5-VL commentary, batched with evictions and M-RoPE, on CUDA as on the CPU (fp32); in bf16 (the
    serving dtype) it runs to the end with finite logits."""
    cpu = _commentary_logits(load_model(qwen_dir, device="cpu", dtype=torch.float32))
    torch.testing.assert_close(_commentary_logits(load_model(qwen_dir, device="cuda", dtype=torch.float32)), cpu,
                               atol=1e-3, rtol=1e-3)
    bf16 = _commentary_logits(load_model(qwen_dir, device="cuda", dtype=torch.bfloat16))
    assert torch.isfinite(bf16).all()
