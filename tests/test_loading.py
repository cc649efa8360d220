"""Checkpoint loading: both layouts, LM and vision families, LoRA merge, the vision hand computation,
and clear CheckpointErrors for broken checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, CLIPVisionModel, LlamaForCausalLM, Qwen2ForCausalLM, SiglipModel,
                          SiglipVisionModel)

from liveserve.config import SessionConfig
from liveserve.engine.events import FrameDecision, ResponseDone
from liveserve.engine.live.session import Session
from liveserve.model.live import build_connector
from liveserve.model.checkpoint import CheckpointError
from liveserve.model.loading import load_model
from liveserve.model.tiny import write_tiny_checkpoint
from liveserve.model.vision import FrameLayout

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load(path, **kw):
    return load_model(path, device="cpu", dtype=torch.float32, **kw)


def pixels(n: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("clip"), vision="clip")


@pytest.fixture(scope="module")
def merged(release_dir):
    return load(release_dir)


@pytest.fixture(scope="module")
def unmerged(release_dir):
    return load(release_dir, merge_lora=False)


# ---- layouts and families -----------------------------------------------------------------------


def test_frame_layout_default():
    assert FrameLayout() == FrameLayout(cls_token=True, pooled=3)
    assert FrameLayout().num_tokens == 10
    assert FrameLayout(cls_token=False).num_tokens == 9 and FrameLayout(pooled=2).num_tokens == 5


@pytest.mark.parametrize("llm,vision", [("llama", "siglip"), ("llama", "clip"), ("qwen2", "siglip"),
                                        ("qwen2", "clip")])
def test_liveserve_layout_families(tmp_path, tiny_model, llm, vision):
    model = tiny_model if (llm, vision) == ("llama", "siglip") else \
        load(write_tiny_checkpoint(tmp_path, llm=llm, vision=vision))
    assert type(model.lm) is {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[llm]
    assert type(model.vision.tower) is {"siglip": SiglipVisionModel, "clip": CLIPVisionModel}[vision]
    assert model.vision.kind == vision
    assert model.layout == FrameLayout()
    assert (model.vision_hidden_size, model.frame_size, model.hidden_size) == (32, 64, 64)
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (2, 2, 16)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    feats = model.encode_frames(pixels(2))
    assert feats.shape == (2, 10, 32) and feats.dtype == torch.float32
    assert not torch.allclose(feats[0], feats[1])
    assert model.embed_frames(feats).shape == (20, 64)


def test_release_layout_loads(merged):
    assert type(merged.lm) is LlamaForCausalLM
    assert type(merged.vision.tower) is SiglipVisionModel and merged.vision.kind == "siglip"
    assert merged.layout == FrameLayout() and merged.template.frame_num_tokens == 10
    assert not hasattr(merged.lm, "connector")
    assert merged.encode_frames(pixels(3)).shape == (3, 10, 32)


# ---- LoRA merge ---------------------------------------------------------------------------------


def _adapter_state(release_dir) -> dict[str, torch.Tensor]:
    return load_file(str(release_dir / "adapter_model.safetensors"))


def _release_connector(release_dir) -> torch.nn.Module:
    state = _adapter_state(release_dir)
    prefix = "base_model.model.connector."
    connector = build_connector(32, 64)
    connector.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return connector


def test_merged_and_unmerged_give_same_logits_and_differ_from_base(release_dir, merged, unmerged):
    base = AutoModelForCausalLM.from_pretrained(str(release_dir.parent / "base"), dtype=torch.float32).eval()
    embeds = torch.randn(1, 12, 64)
    feats = torch.randn(2, 10, 32)
    with torch.no_grad():
        a = merged.lm(inputs_embeds=embeds).logits
        b = unmerged.lm(inputs_embeds=embeds).logits
        c = base(inputs_embeds=embeds).logits
        assert (a - b).abs().max().item() < 1e-4
        assert (a - c).abs().max().item() > 1e-2
        # The connector is the adapter's trained copy (modules_to_save), in both modes.
        expected = _release_connector(release_dir)(feats)
        assert torch.allclose(merged.connector(feats), expected, atol=1e-6)
        assert torch.allclose(unmerged.connector(feats), expected, atol=1e-6)
        assert not torch.allclose(build_connector(32, 64)(feats), expected, atol=1e-3)


def test_lm_head_lora_is_merged(release_dir, merged):
    """merged W = W_base + (alpha / r) * B @ A, for lm_head and an attention projection."""
    state = _adapter_state(release_dir)
    config = json.loads((release_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    base = AutoModelForCausalLM.from_pretrained(str(release_dir.parent / "base"), dtype=torch.float32)
    for name in ("lm_head", "model.layers.1.self_attn.q_proj"):
        a = state[f"base_model.model.{name}.lora_A.weight"]
        b = state[f"base_model.model.{name}.lora_B.weight"]
        expected = base.get_submodule(name).weight + scale * b @ a
        got = merged.lm.get_submodule(name).weight
        assert type(merged.lm.get_submodule(name)) is torch.nn.Linear
        assert torch.allclose(got, expected, atol=1e-5)
        assert (got - base.get_submodule(name).weight).abs().max() > 1e-3


def test_unmerged_model_runs_a_session_like_merged(merged, unmerged):
    decisions = []
    for model in (merged, unmerged):
        s = Session(model, SessionConfig(max_new_tokens=2))
        torch.manual_seed(3)
        for t in range(3):
            s.push_frame(float(t), torch.randn(10, 32))
        decisions.append([e.p_silent for e in s.process() if isinstance(e, FrameDecision)])
    assert decisions[0] == pytest.approx(decisions[1], abs=1e-5)


# ---- vision hand computation --------------------------------------------------------------------


def _pool_grid(patches: torch.Tensor, k: int = 3) -> torch.Tensor:
    """[N, side*side, C] row-major patches -> [N, k*k, C], adaptive average pooling by hand."""
    n, count, c = patches.shape
    side = int(count ** 0.5)
    grid = patches.reshape(n, side, side, c)
    out = []
    for i in range(k):
        for j in range(k):
            r0, r1 = (i * side) // k, -(-((i + 1) * side) // k)
            c0, c1 = (j * side) // k, -(-((j + 1) * side) // k)
            out.append(grid[:, r0:r1, c0:c1].mean(dim=(1, 2)))
    return torch.stack(out, dim=1)


def _normalise(px, mean, std):
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (px.float() / 255.0 - mean) / std


def test_siglip_features_match_hand_computation(tiny_dir, tiny_model):
    px = pixels(2)
    tower = SiglipVisionModel.from_pretrained(str(tiny_dir / "vision"), dtype=torch.float32).eval()
    with torch.no_grad():
        out = tower(pixel_values=(px.float() / 255.0 - 0.5) / 0.5)
        assert out.last_hidden_state.shape == (2, 64, 32)
        expected = torch.cat([out.pooler_output[:, None], _pool_grid(out.last_hidden_state)], dim=1)
        pooled = F.adaptive_avg_pool2d(out.last_hidden_state.reshape(2, 8, 8, 32).permute(0, 3, 1, 2), 3)
        assert torch.allclose(expected[:, 1:], pooled.flatten(2).transpose(1, 2), atol=1e-6)
    assert torch.allclose(tiny_model.encode_frames(px), expected, atol=1e-5)


def test_release_siglip_from_full_checkpoint_matches_hand_computation(release_dir, merged):
    """The release's vision dir is a full SiglipModel (text + vision): its vision weights must load."""
    px = pixels(2, seed=2)
    full = SiglipModel.from_pretrained(str(release_dir.parent / "vision"), dtype=torch.float32).eval()
    with torch.no_grad():
        out = full.vision_model(pixel_values=_normalise(px, (0.5,) * 3, (0.5,) * 3))
    expected = torch.cat([out.pooler_output[:, None], _pool_grid(out.last_hidden_state)], dim=1)
    assert torch.allclose(merged.encode_frames(px), expected, atol=1e-5)


def test_clip_features_match_hand_computation(clip_dir):
    model = load(clip_dir)
    px = pixels(2, seed=3)
    tower = CLIPVisionModel.from_pretrained(str(clip_dir / "vision"), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = tower(pixel_values=_normalise(px, CLIP_MEAN, CLIP_STD)).last_hidden_state
    assert hidden.shape == (2, 65, 32)
    expected = torch.cat([hidden[:, :1], _pool_grid(hidden[:, 1:])], dim=1)
    got = model.encode_frames(px)
    assert torch.allclose(got, expected, atol=1e-5)
    # SigLIP's normalisation would give different features: the CLIP statistics are really used.
    with torch.no_grad():
        wrong = tower(pixel_values=_normalise(px, (0.5,) * 3, (0.5,) * 3)).last_hidden_state[:, :1]
    assert not torch.allclose(got[:, :1], wrong, atol=1e-3)


def test_image_and_features_paths_agree(tiny_model):
    images = pixels(3, seed=4)
    runs = []
    for as_features in (False, True):
        s = Session(tiny_model, SessionConfig(max_new_tokens=2))
        for t, img in enumerate(images):
            s.push_frame(float(t), tiny_model.encode_frames(img[None])[0] if as_features else img)
        runs.append(list(s.process()))
    frames = [[e for e in run if isinstance(e, FrameDecision)] for run in runs]
    assert len(frames[0]) == len(frames[1]) == 3
    for a, b in zip(*frames):
        assert abs(a.p_silent - b.p_silent) < 1e-6
        assert (a.action, a.token_id, a.cache_tokens) == (b.action, b.token_id, b.cache_tokens)
    texts = [[(e.text, e.num_tokens) for e in run if isinstance(e, ResponseDone)] for run in runs]
    assert texts[0] == texts[1]


# ---- errors -------------------------------------------------------------------------------------


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_json(file, **changes):
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def test_error_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_error_no_config(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / "live_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"neither live_config\.json .* nor adapter_config\.json"):
        load(ckpt)


def test_error_live_config_without_llm(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    _edit_json(ckpt / "live_config.json", llm=...)
    with pytest.raises(CheckpointError, match="missing key 'llm'"):
        load(ckpt)


def test_error_connector_deleted(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / "connector.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"connector.safetensors are missing"):
        load(ckpt)


def test_error_connector_wrong_shape(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    save_file(build_connector(16, 64).state_dict(), str(ckpt / "connector.safetensors"))
    shape = r"connector\.safetensors: 0\.weight has shape \(64, 16\), the model needs \(64, 32\)"
    with pytest.raises(CheckpointError, match=shape):
        load(ckpt)


def test_error_llm_without_config(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / "llm" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"LLM directory .*llm has no config\.json"):
        load(ckpt)


def test_error_release_with_hub_base_name(release_dir, tmp_path):
    root = _copy(release_dir.parent, tmp_path)
    hub = "meta-llama/Meta-Llama-3-8B-Instruct"
    _edit_json(root / "adapter" / "adapter_config.json", base_model_name_or_path=hub)
    with pytest.raises(CheckpointError) as err:
        load(root / "adapter")
    assert "base_model=" in str(err.value) and hub in str(err.value) and "not a local directory" in str(err.value)
    # Naming the base explicitly fixes it.
    assert type(load(root / "adapter", base_model=root / "base").lm) is LlamaForCausalLM


def test_error_adapter_without_connector(release_dir, tmp_path):
    root = _copy(release_dir.parent, tmp_path)
    _edit_json(root / "adapter" / "adapter_config.json", modules_to_save=None)
    with pytest.raises(CheckpointError, match=r"modules_to_save must contain 'connector'"):
        load(root / "adapter")


# ---- vision-only loading (Perception replicas) ------------------------------------------------------


def test_vision_only_load_never_reads_the_lm(tiny_dir, tiny_model, tmp_path):
    """Without the LM's weights on disk the vision tower still loads (and the full model does not): the LM
    is never materialized. The features equal the full model's."""
    from liveserve.model.loading import load_vision_model

    copy = tmp_path / "no-lm"
    shutil.copytree(tiny_dir, copy)
    for weights in (copy / "llm").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError):
        load(copy)
    vision = load_vision_model(copy, device="cpu", dtype=torch.float32)
    assert not hasattr(vision, "lm") and not hasattr(vision, "connector")
    tower_params = sum(p.numel() for p in tiny_model.vision.parameters())
    assert sum(p.numel() for p in vision.parameters()) == tower_params
    assert (vision.frame_size, vision.layout, vision.vision_hidden_size) == \
        (tiny_model.frame_size, tiny_model.layout, tiny_model.vision_hidden_size)
    px = pixels(2, seed=5)
    assert torch.equal(vision.encode_frames(px), tiny_model.encode_frames(px))


def test_vision_only_load_of_a_release_needs_no_base_model(release_dir, merged, tmp_path):
    from liveserve.model.loading import load_vision_model

    root = tmp_path / "release"
    shutil.copytree(release_dir.parent, root)
    shutil.rmtree(root / "base")
    vision = load_vision_model(root / "adapter", device="cpu", dtype=torch.float32)
    px = pixels(2, seed=6)
    assert torch.equal(vision.encode_frames(px), merged.encode_frames(px))
    with pytest.raises(CheckpointError, match="vision"):
        load_vision_model(root / "adapter", vision_model=tmp_path / "missing", device="cpu")


def test_perception_encodes_frames_with_the_vision_only_model(tiny_dir, tiny_model):
    from liveserve.model.loading import load_vision_model
    from liveserve.services.client.stream import encode_jpeg
    from liveserve.services.wire.contracts import EncodeRequest, FrameImage
    from liveserve.services.perception.service import FrameEncoder

    encoder = FrameEncoder(load_vision_model(tiny_dir, device="cpu", dtype=torch.float32))
    try:
        result = encoder.encode_now(EncodeRequest(tuple(FrameImage("s", i, i * 0.5, encode_jpeg(p))
                                                        for i, p in enumerate(pixels(2, seed=7)))))
    finally:
        encoder.close()
    assert result.errors == ("", "")
    assert [tuple(f.shape) for f in result.features] == [(tiny_model.layout.num_tokens,
                                                          tiny_model.vision_hidden_size)] * 2


def test_a_tiny_qwen2_5_vl_checkpoint_runs_in_transformers_and_in_liveserve(tmp_path, capsys):
    """`liveserve tiny --family qwen2_5_vl` writes StreamingVLM's release layout: Hugging Face loads it and
    runs an image through it, and so does liveserve (its commentary family); a Qwen2-VL directory without its
    pieces is refused naming the one missing (tests/test_qwen2_vl.py loads a whole one)."""
    import numpy as np
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from liveserve.cli import main

    out = tmp_path / "streamingvlm"
    assert main(["tiny", str(out), "--family", "qwen2_5_vl"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    tokenizer, images = AutoTokenizer.from_pretrained(out), Qwen2VLImageProcessor.from_pretrained(out)
    assert tokenizer.bos_token is None and model.config.model_type == "qwen2_5_vl"
    frame = np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8)
    pixels = images(images=[frame], return_tensors="pt")
    merged = int(pixels["image_grid_thw"].prod()) // images.merge_size ** 2  # tokens the frame becomes
    text = "<|vision_start|>" + "<|image_pad|>" * merged + "<|vision_end|>Time=0-1s"
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"]).logits
    assert logits.shape[:2] == ids["input_ids"].shape and torch.isfinite(logits).all()

    served = load_model(out, device="cpu")
    assert served.family == "qwen2_5_vl" and served.frame_size == 112  # 112 x 112 = the processor's max_pixels
    qwen2_vl = tmp_path / "livecc"
    qwen2_vl.mkdir()
    (qwen2_vl / "config.json").write_text('{"model_type": "qwen2_vl"}')
    with pytest.raises(CheckpointError, match="livecc has no preprocessor_config.json"):
        load_model(qwen2_vl)
    assert main(["tiny", str(tmp_path / "x"), "--family", "qwen2_5_vl", "--llm", "qwen2"]) == 2
    assert "--llm applies to --family live only" in capsys.readouterr().err
