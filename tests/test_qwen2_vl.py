"""The Qwen2-VL family (LiveCC's base) on a tiny random checkpoint in its release layout: transformers loads
what `liveserve tiny --family qwen2_vl` writes, and the engine's logits, alone and batched, equal
`Qwen2VLForConditionalGeneration`'s over the same tokens and frames (its tower, merger and M-RoPE, whose
temporal position steps one per temporal group)."""

from __future__ import annotations

import json

import pytest
import torch

from liveserve.config import CommentaryConfig, EngineConfig, PoolConfig, SchedulerConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.commentary.session import CommentarySession
from liveserve.model.loading import load_model

# Two temporal groups a chunk (4 frames at 1 FPS, 2 s a group): where Qwen2-VL's temporal positions (one per
# group) and Qwen2.5-VL's (in seconds) part.
TWO_GROUPS = dict(chunk_s=4.0, fps=1.0)


@pytest.fixture(scope="module")
def livecc_dir(tmp_path_factory):
    from liveserve.cli import main

    out = tmp_path_factory.mktemp("livecc") / "tiny"
    assert main(["tiny", str(out), "--family", "qwen2_vl"]) == 0
    return out


@pytest.fixture(scope="module")
def livecc(livecc_dir):
    return load_model(livecc_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def hf(livecc_dir):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(livecc_dir, attn_implementation="sdpa").eval()


def frames(model, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, model.frame_size, model.frame_size), dtype=torch.uint8, generator=g)
            for _ in range(n)]


def config(**overrides) -> SessionConfig:
    return SessionConfig(mode="commentary", commentary=CommentaryConfig(**{"max_tokens_per_chunk": 3, **overrides}))


def transformers_logits(model, hf, session, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the session's logits at every step, transformers' at the same tokens) over all it fed, no eviction."""
    steps = [step for step, _ in session.trace]
    ids = torch.tensor([i for step in steps for i in step.ids])[None]
    per_chunk = session.commentary.frames_per_chunk
    chunks = [torch.stack(images[i:i + per_chunk]) for i in range(0, len(images), per_chunk)]
    grid = model.grid(per_chunk)
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values_videos=torch.cat([model.patchify(c) for c in chunks]),
                    video_grid_thw=torch.tensor([[grid.t, 2 * grid.h, 2 * grid.w]] * len(chunks)),
                    mm_token_type_ids=(ids == model.template.video_pad).long() * 2).logits[0].float()
    ends = torch.tensor([step.num_tokens for step in steps]).cumsum(0) - 1
    return torch.stack([logits for _, logits in session.trace]), logits[ends]


def test_the_release_layout_loads_in_transformers_and_in_liveserve(livecc_dir, livecc, hf):
    config_json = json.loads((livecc_dir / "config.json").read_text())
    assert config_json["model_type"] == "qwen2_vl" and "text_config" not in config_json  # flat, as released
    assert {"embed_dim", "mlp_ratio"} <= set(config_json["vision_config"])
    assert hf.config.text_config.hidden_size == config_json["hidden_size"]
    assert livecc.family == "qwen2_vl" and livecc.forward_path == "direct" and livecc.frame_size == 112
    assert type(livecc.vision).__name__ == "Qwen2VisionTransformerPretrainedModel"


@pytest.mark.parametrize("chunking", [{}, TWO_GROUPS], ids=["2fps-1s", "two-groups"])
def test_engine_logits_equal_transformers_qwen2_vl_forward(livecc, hf, chunking):
    session = CommentarySession(livecc, config(**chunking))
    session.trace = []
    images = frames(livecc, 8, seed=1)
    fps = session.commentary.fps
    for i, image in enumerate(images):
        if i == 4:
            session.push_query(i / fps, "Who scores?")
        session.push_frame(i / fps, image)
    list(session.process())
    ours, theirs = transformers_logits(livecc, hf, session, images)
    assert len(ours) == 8 // session.commentary.frames_per_chunk * 3
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_batched_sessions_equal_transformers_qwen2_vl_forward(livecc, hf):
    engine = BatchEngine(livecc, EngineConfig(pool=PoolConfig(budget_tokens=32768),
                                              scheduler=SchedulerConfig(max_lag_s=None, max_queued_frames=1000)))
    images = {k: frames(livecc, 4 + 2 * k, seed=10 + k) for k in range(3)}
    for k, shown in images.items():
        session = engine.open(f"s{k}", config())
        session.trace = []
        for i, image in enumerate(shown):
            session.push_frame(i * 0.5, image)
    engine.run_until_idle(timeout_s=60)
    for k, shown in images.items():
        ours, theirs = transformers_logits(livecc, hf, engine.session(f"s{k}"), shown)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_kept_positions_are_qwen2_vl_get_rope_index_after_evictions(livecc, hf):
    session = CommentarySession(livecc, config(vision_window_chunks=2, text_rounds=3, text_sink_tokens=2,
                                               text_window_tokens=3, **TWO_GROUPS))
    for i, image in enumerate(frames(livecc, 24, seed=3)):
        session.push_frame(float(i), image)
    list(session.process())
    assert sum(p.kind == "vision" for p in session.pieces) == 2
    ids = torch.tensor(session.kept_ids())[None]
    grid = livecc.grid(4)
    rows, _ = hf.model.get_rope_index(ids, (ids == livecc.template.video_pad).long() * 2,
                                      video_grid_thw=torch.tensor([[grid.t, 2 * grid.h, 2 * grid.w]] * 2))
    assert session.cache.kept_positions().tolist() == rows[0, 0].tolist()


def test_liveserve_run_comments_on_a_qwen2_vl_directory(livecc_dir, capsys):
    from liveserve.cli import main

    assert main(["run", "--model", str(livecc_dir), "--mode", "commentary", "--max-frames", "4",
                 "--max-tokens-per-chunk", "3", "--decoding", "reference", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "commentary every 1s" in err and "4 frames" in err
