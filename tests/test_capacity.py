"""Capacity: the `bench capacity` report, its single-stream reference loop, the model presets, the KV pool's
memory fraction, the per-step token budget and the capacity line `serve` logs."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import frame_bank
from liveserve.bench.capacity import sweep_levels
from liveserve.bench.capacity_settings import CapacitySettings
from liveserve.bench.open_loop import DecisionBias
from liveserve.bench.single_stream import engine_single_stream, reference_single_stream
from liveserve.cli import main
from liveserve.config import CacheConfig, EngineConfig, PoolConfig, SchedulerConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.kv_pool import CPU_BUDGET_BYTES, default_budget_bytes
from liveserve.model.presets import PRESETS, build_preset_model

LEVEL_FIELDS = {"sessions", "admitted", "frames_due", "frames_decided", "p50_ms", "p99_ms", "dropped", "undecided",
                "failed_sessions", "replies", "reply_rate", "memory", "meets_slo"}


def test_bench_capacity_writes_levels_capacity_and_speedup_for_features_and_pixels(tmp_path):
    for kind, attention, forward in (("features", "flex", "hf"), ("pixels", "auto", "direct")):
        out = tmp_path / f"{kind}.json"
        assert main(["bench", "capacity", "--preset", "tiny", "--device", "cpu", "--input", kind, "--sessions", "1,3",
                     "--duration", "1.5", "--warmup", "0.25", "--prefill-frames", "2", "--single-frames", "8",
                     "--attention", attention, "--forward", forward, "--threads", "1", "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["benchmark"] == "capacity" and report["preset"] == "tiny" and report["input"] == kind
        assert report["attention"] == ("flex" if attention == "flex" else "sdpa")  # auto on a CPU: sdpa
        assert report["forward"] == forward
        assert [level["sessions"] for level in report["levels"]] == [1, 3]
        for level in report["levels"]:
            assert LEVEL_FIELDS <= set(level), set(level) ^ LEVEL_FIELDS
            assert level["admitted"] == level["sessions"] and level["frames_due"] > 0
            assert level["memory"]["kind"] == "rss" and level["memory"]["rss_bytes"] > 0
            assert level["frames_decided"] + level["dropped"] + level["undecided"] == level["frames_due"]
        assert report["capacity"] in (0, 1, 3)
        assert report["capacity"] == max([lv["sessions"] for lv in report["levels"] if lv["meets_slo"]], default=0)
        assert report["pool"]["sessions_admitted"] >= 3
        assert report["single_stream"]["decisions_match"] is True
        assert report["single_stream_speedup"] > 0


@pytest.mark.parametrize("kind", ["features", "pixels"])
def test_reference_loop_decides_and_replies_like_the_engine(tiny_model, kind):
    """The speedup compares equal work: the DynamicCache loop and the engine fire on the same frames and
    write replies of the same lengths, under the same calibrated decision bias."""
    settings = CapacitySettings(max_new_tokens=3, single_stream_frames=24)
    if kind == "features":
        frames = frame_bank(tiny_model, 40, seed=2)
    else:
        g = torch.Generator().manual_seed(2)
        size = tiny_model.frame_size
        frames = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(40)]
    calibration, frames = frames[:16], frames[16:]
    bias = DecisionBias(tiny_model)
    try:
        bias.calibrate(calibration, reply_rate=0.25, threshold=settings.threshold)
        engine_decisions, engine_replies, _ = engine_single_stream(tiny_model, frames, settings)
        reference_decisions, reference_replies, _ = reference_single_stream(tiny_model, frames, settings)
    finally:
        bias.remove()
    fired = [f for _, f in engine_decisions]
    assert any(fired) and not all(fired)
    assert fired == [f for _, f in reference_decisions]
    assert engine_replies == reference_replies and len(engine_replies) == sum(fired)
    for (p, _), (q, _) in zip(engine_decisions, reference_decisions):
        assert p == pytest.approx(q, abs=1e-4)


def test_sweep_levels_double_up_to_the_maximum():
    assert sweep_levels(1) == [1]
    assert sweep_levels(8) == [1, 2, 4, 8]
    assert sweep_levels(20) == [1, 2, 4, 8, 16, 20]


def test_presets_have_the_real_sizes_and_build_on_the_target_device():
    """Built on the meta device nothing is allocated: parameters are created where the device context says,
    which is how the 8B preset lands on a GPU without passing through host memory."""
    model = build_preset_model("llama3-8b-siglip", device="meta", dtype=torch.bfloat16)
    lm, tower = model.lm.config, model.vision.tower.config
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.num_key_value_heads) == (4096, 32, 32, 8)
    rope_theta = getattr(lm, "rope_theta", None) or lm.rope_parameters["rope_theta"]
    assert (lm.intermediate_size, lm.vocab_size, rope_theta) == (14336, 128256, 5e5)
    assert (tower.hidden_size, tower.num_hidden_layers, tower.image_size, tower.patch_size) == (1152, 27, 384, 14)
    params = list(model.parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
    assert 8.0e9 < sum(p.numel() for p in params) < 8.6e9
    assert model.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32 under a bf16 default
    assert set(PRESETS) >= {"tiny", "llama3-8b-siglip"} and any("1b" in name for name in PRESETS)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_preset_model("gpt-5")


def test_pool_takes_a_fraction_of_free_gpu_memory_and_a_fixed_budget_on_cpu():
    assert default_budget_bytes(torch.device("cpu"), 0.5) == default_budget_bytes(torch.device("cpu")) \
        == CPU_BUDGET_BYTES
    assert PoolConfig().memory_fraction == 0.9
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="memory_fraction"):
            PoolConfig(memory_fraction=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_gpu_pool_takes_its_fraction_of_the_memory_left_after_weights():
    free, _ = torch.cuda.mem_get_info()
    budget = default_budget_bytes(torch.device("cuda"), 0.5)
    assert 0.45 * free <= budget <= 0.55 * free


def _engine_with_streaming_sessions(model, count: int, scheduler: SchedulerConfig) -> BatchEngine:
    """`count` sessions past their first frame (which carries the system prompt), each with one more frame
    queued: a frame step of 11 tokens each."""
    config = SessionConfig(threshold=0.0, replies="none",
                           cache=CacheConfig(policy="sink_window", window_frames=2, evict_frames=1))
    engine = BatchEngine(model, EngineConfig(pool=PoolConfig(budget_tokens=count * 1800), scheduler=scheduler))
    features = frame_bank(model, 2)
    for k in range(count):
        engine.open(f"s{k}", config)
        engine.push_frame(f"s{k}", 0.0, features[0])
    engine.run_until_idle()
    for k in range(count):
        engine.push_frame(f"s{k}", 0.5, features[1])
    return engine


def test_a_step_is_bounded_by_its_token_budget_not_a_session_count(tiny_model):
    engine = _engine_with_streaming_sessions(tiny_model, 100, SchedulerConfig(max_lag_s=None))
    frame_tokens = engine.sessions[0].next_step_tokens()
    assert frame_tokens == tiny_model.layout.num_tokens + 1
    engine.step()
    assert len(engine.last_batch) == 100  # 1,100 tokens fit the default budget of 4,096: no 64-session cap
    engine.shutdown()

    engine = _engine_with_streaming_sessions(tiny_model, 30, SchedulerConfig(max_lag_s=None,
                                                                             max_batch_tokens=7 * frame_tokens))
    batches = []
    while engine.has_work():
        engine.step()
        batches.append(len(engine.last_batch))
    assert batches == [7, 7, 7, 7, 2]  # the budget fills each step; everyone is served within ceil(30 / 7)
    assert all(s.frames_decided == 2 for s in engine.sessions)
    engine.shutdown()


def test_engine_describes_how_many_sessions_of_a_policy_its_pool_admits(tiny_model):
    engine = BatchEngine(tiny_model, EngineConfig(pool=PoolConfig(budget_tokens=10_000)))
    config = SessionConfig(cache=CacheConfig(policy="sink_window", window_frames=8, evict_frames=4))
    tokens = engine.session_tokens(config)
    admits = engine.pool.num_blocks // engine.pool.blocks_for(tokens)
    line = engine.describe_capacity(config)
    assert f"admits {admits} sessions of cache policy sink_window ({tokens} tokens" in line
    opened = 0
    while engine.pool.can_admit(tokens):
        engine.open(f"s{opened}", config)
        opened += 1
    assert opened == admits
    engine.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_gpu_preset_is_built_on_the_device_in_bf16_and_runs_a_level(tmp_path):
    from liveserve.bench.capacity import run_capacity_bench

    model = build_preset_model("tiny", device="cuda")
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in model.parameters())
    settings = CapacitySettings(duration_s=1.5, warmup_s=0.25, prefill_frames=2, single_stream_frames=8)
    report = run_capacity_bench(model, levels=[2], settings=settings, out=str(tmp_path / "gpu.json"), preset="tiny",
                                memory_fraction=0.02)  # a tiny model needs little of the GPU
    assert report["levels"][0]["memory"]["kind"] == "gpu" and report["levels"][0]["frames_decided"] > 0


def test_a_decision_replica_logs_how_many_sessions_its_pool_admits(tiny_model, caplog):
    from liveserve.services.decision.service import DecisionService
    from liveserve.services.settings import ServiceSettings

    settings = ServiceSettings(model="tiny", pool_mb=8)
    with caplog.at_level("INFO", logger="liveserve.services.decision.service"):
        service = DecisionService(tiny_model, settings, "replica-1")
    expected = service.engine.pool.sessions_admitted(service.engine.session_tokens(settings.session_defaults()))
    assert expected > 0
    assert any(f"admits {expected} sessions of cache policy sink_window" in r.getMessage() for r in caplog.records)
    service.engine.shutdown()


def test_bench_capacity_takes_a_commentary_model(qwen_dir, tmp_path):
    """A Qwen2.5-VL model in its own mode: chunks of pixels, a chunk's latency from its last frame, no
    calibrated bias and no single-stream reference loop (null speedup)."""
    out = tmp_path / "commentary.json"
    assert main(["bench", "capacity", "--model", str(qwen_dir), "--device", "cpu", "--input", "pixels",
                 "--sessions", "1,2", "--duration", "2", "--warmup", "0.5", "--prefill-frames", "4",
                 "--max-tokens-per-chunk", "3", "--slo-ms", "60000", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["family"] == "qwen2_5_vl" and report["mode"] == "commentary"
    assert report["single_stream_speedup"] is None and report["decision_bias"] is None
    assert [level["sessions"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["frames_decided"] == level["frames_due"] > 0 and level["undecided"] == 0, level
        assert level["meets_slo"] and level["replies"] > 0
    assert report["capacity"] == 2


def test_bench_capacity_refuses_features_for_a_commentary_model(qwen_dir, tmp_path, capsys):
    assert main(["bench", "capacity", "--model", str(qwen_dir), "--device", "cpu", "--input", "features",
                 "--sessions", "1", "--json", str(tmp_path / "x.json")]) == 2
    assert "encodes each chunk of frames itself: use --input pixels" in capsys.readouterr().err


@pytest.mark.parametrize("flag,message", [(["--attention", "flashinfer"], "attention 'flashinfer' cannot run here"),
                                          (["--cuda-graphs"], "CUDA graphs need a CUDA device")])
def test_what_cannot_run_here_is_refused_before_any_work(tmp_path, capsys, flag, message):
    out = tmp_path / "capacity.json"
    assert main(["bench", "capacity", "--preset", "tiny", "--device", "cpu", "--sessions", "1", "--duration", "1",
                 "--warmup", "0", *flag, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "single stream" not in err and not out.exists()
