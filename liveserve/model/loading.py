"""Load a LIVE model from local directories (never from a hub).

Two layouts:

liveserve layout (what `liveserve train` and the tiny factory write)::

    DIR/live_config.json      {"format": "liveserve.live/1", "llm": "llm", "vision": "vision", ...}
    DIR/llm/                  a Hugging Face causal LM (Llama or Qwen2 family) + its tokenizer
    DIR/vision/               a SigLIP or CLIP vision model (full or vision-only checkpoint)
    DIR/connector.safetensors {0,2}.{weight,bias} (Linear, GELU, Linear)

VideoLLM-online release layout (e.g. videollm-online-8b-v1plus)::

    DIR/adapter_config.json   PEFT LoRA on q/k/v/o/gate/up/down_proj and lm_head; connector in modules_to_save
    DIR/adapter_model.safetensors
    base LLM dir              `base_model=` or adapter_config's base_model_name_or_path when it is local
    vision dir                `vision_model=` or config.json's vision_pretrained when it is local

LoRA is merged into the base weights at load (one matmul per linear instead of three); pass
merge_lora=False to keep the adapter separate, e.g. to check the merge.

`load_vision_model` reads only the vision tower (and the frame layout) of either layout: the LM's
weights are never opened, which is all a Perception replica needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, SiglipVisionModel

from liveserve.model.attention import ATTN_IMPLEMENTATION
from liveserve.model.checkpoint import CheckpointError, check_supported
from liveserve.model.live import LiveModel, build_connector
from liveserve.model.template import DEFAULT_SYSTEM_PROMPT, StreamTemplate
from liveserve.model.vision import (CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, FrameLayout, VisionEncoder,
                                    VisionModel)

LIVE_CONFIG = "live_config.json"
LIVE_FORMAT = "liveserve.live/1"
CONNECTOR_FILE = "connector.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(path: str | Path, *, base_model: str | Path | None = None, vision_model: str | Path | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               merge_lora: bool = True, load_vision: bool = True) -> LiveModel:
    """Load a LIVE model from `path` in either layout (see module docs)."""
    path, device, dtype = _target(path, device, dtype)
    model_type = _model_type(path)
    if model_type == "qwen2_5_vl":
        from liveserve.model.qwen_vl import load_qwen_vl

        return load_qwen_vl(path, device, dtype)
    if model_type == "qwen2_vl":
        from liveserve.model.qwen2_vl import load_qwen2_vl

        return load_qwen2_vl(path, device, dtype)
    if (path / LIVE_CONFIG).is_file():
        model = _load_liveserve(path, device, dtype, load_vision)
    elif (path / ADAPTER_CONFIG).is_file():
        model = _load_videollm_online(path, base_model, vision_model, device, dtype, merge_lora, load_vision)
    else:
        raise _unknown_layout(path)
    return model.eval().requires_grad_(False)


def load_vision_model(path: str | Path, *, vision_model: str | Path | None = None,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> VisionModel:
    """The vision tower of the LIVE checkpoint at `path` (either layout), without its LM or connector; for a
    Qwen2.5-VL or Qwen2-VL checkpoint, what its Perception does (decode and resize frames: qwen_vl.FramePixels)."""
    path, device, dtype = _target(path, device, dtype)
    if _model_type(path) in COMMENTARY_FAMILIES:  # its tower runs on the LM's replica: Perception sends pixels
        from liveserve.model.qwen_vl import load_frame_pixels

        return load_frame_pixels(path)
    if (path / LIVE_CONFIG).is_file():
        config = _live_config(path)
        vision_dir, layout = _subdir(path, config, "vision"), _live_layout(config)
    elif (path / ADAPTER_CONFIG).is_file():
        extra = _release_config(path)
        vision_dir, layout = _release_vision_dir(path, vision_model, extra), _release_layout(extra)
    else:
        raise _unknown_layout(path)
    vision = _load_vision(vision_dir, layout, device, dtype)
    model = VisionModel(vision, frame_size=_vision_config(vision_dir).image_size, name=str(path))
    return model.eval().requires_grad_(False)


# Served in commentary mode, by config.json's model_type: Qwen2.5-VL (StreamingVLM; liveserve.model.qwen_vl)
# and Qwen2-VL (LiveCC; liveserve.model.qwen2_vl).
COMMENTARY_FAMILIES = ("qwen2_5_vl", "qwen2_vl")


def require_live(model, what: str):
    """`model` if it is a LIVE model; else why `what` cannot take it (its family runs in commentary mode)."""
    if model.family != "live":
        raise CheckpointError(f"{model.name} is a {model.family} model (commentary mode): {what} takes LIVE models "
                              "only so far; `liveserve run --model DIR` and `liveserve bench batch` run it")
    return model


def _model_type(path: Path) -> str:
    """config.json's model_type, "" when there is none to read."""
    config = path / "config.json"
    if config.is_file():
        try:
            return str(json.loads(config.read_text()).get("model_type", ""))
        except (ValueError, AttributeError):
            pass
    return ""


def _unknown_layout(path: Path) -> CheckpointError:
    """Why `path` is not a checkpoint liveserve serves."""
    return CheckpointError(f"{path} has neither {LIVE_CONFIG} (liveserve layout) nor {ADAPTER_CONFIG} "
                           f"(VideoLLM-online layout), nor a config.json of model_type "
                           f"{' or '.join(map(repr, COMMENTARY_FAMILIES))} (StreamingVLM's and LiveCC's layouts)")


def _target(path, device, dtype) -> tuple[Path, torch.device, torch.dtype]:
    """The checkpoint directory (it must exist), and the device and dtype to load onto."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    device = torch.device(device) if device is not None else default_device()
    return path, device, dtype or default_dtype(device)


def _live_config(path: Path) -> dict:
    config = _read_json(path / LIVE_CONFIG)
    if config.get("format") != LIVE_FORMAT:
        raise CheckpointError(f"{path / LIVE_CONFIG}: format must be {LIVE_FORMAT!r}, got {config.get('format')!r}")
    return config


def _live_layout(config: dict) -> FrameLayout:
    return FrameLayout(cls_token=bool(config.get("frame_cls_token", True)), pooled=int(config.get("frame_pooled", 3)))


def _release_config(path: Path) -> dict:
    """A VideoLLM-online release's config.json (frame layout, vision tower), {} when it has none."""
    return _read_json(path / "config.json") if (path / "config.json").is_file() else {}


def _release_layout(extra: dict) -> FrameLayout:
    pooled = extra.get("frame_token_pooled") or [3, 3]
    return FrameLayout(cls_token=bool(extra.get("frame_token_cls", True)), pooled=int(pooled[0]))


def _release_vision_dir(path: Path, vision_model, extra: dict) -> Path:
    return _local_dir(vision_model or extra.get("vision_pretrained"), path, "vision tower",
                      "config.json vision_pretrained", "vision_model= (CLI --vision-model)")


def _load_liveserve(path: Path, device, dtype, load_vision: bool) -> LiveModel:
    config = _live_config(path)
    llm_dir = _subdir(path, config, "llm")
    lm, tokenizer = _load_lm(llm_dir, device, dtype)
    layout = _live_layout(config)
    vision_dir = _subdir(path, config, "vision")
    tower_config = _vision_config(vision_dir)
    vision = _load_vision(vision_dir, layout, device, dtype) if load_vision else None
    connector = build_connector(tower_config.hidden_size, lm.config.hidden_size)
    _load_connector(connector, path / config.get("connector", CONNECTOR_FILE))
    return _assemble(lm, tokenizer, connector.to(device, dtype), layout, vision, tower_config,
                     config.get("system_prompt", DEFAULT_SYSTEM_PROMPT), str(path))


def _load_videollm_online(path: Path, base_model, vision_model, device, dtype, merge_lora, load_vision) -> LiveModel:
    from peft import PeftModel

    adapter = _read_json(path / ADAPTER_CONFIG)
    extra = _release_config(path)
    base_dir = _local_dir(base_model or adapter.get("base_model_name_or_path"), path, "base LLM",
                          f"{ADAPTER_CONFIG} base_model_name_or_path", "base_model= (CLI --base-model)")
    vision_dir = _release_vision_dir(path, vision_model, extra)
    if "connector" not in (adapter.get("modules_to_save") or []):
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: modules_to_save must contain 'connector' "
                              "(the connector is trained in full in VideoLLM-online)")
    if not (path / "adapter_model.safetensors").is_file() and not (path / "adapter_model.bin").is_file():
        raise CheckpointError(f"{path} has no adapter_model.safetensors")
    lm, tokenizer = _load_lm(base_dir, device, dtype)
    tower_config = _vision_config(vision_dir)
    layout = _release_layout(extra)
    # The release's module tree is LlamaForCausalLM + a top-level `connector`; mirror it so PEFT's keys match.
    lm.connector = build_connector(tower_config.hidden_size, lm.config.hidden_size).to(device, dtype)
    peft_model = PeftModel.from_pretrained(lm, str(path), is_trainable=False)
    lm = peft_model.merge_and_unload() if merge_lora else peft_model.base_model.model
    connector = lm.connector
    if hasattr(connector, "modules_to_save"):  # unmerged: PEFT keeps a ModulesToSaveWrapper around the copy
        connector = connector.modules_to_save["default"]
    del lm.connector
    vision = _load_vision(vision_dir, layout, device, dtype) if load_vision else None
    system_prompt = extra.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
    return _assemble(lm, tokenizer, connector, layout, vision, tower_config, system_prompt, str(path))


def _assemble(lm, tokenizer, connector, layout, vision, tower_config, system_prompt, name) -> LiveModel:
    template = StreamTemplate.from_tokenizer(tokenizer, layout.num_tokens)
    return LiveModel(lm, connector, template, layout, vision, vision_hidden_size=tower_config.hidden_size,
                     frame_size=tower_config.image_size, system_prompt=system_prompt, name=name)


def _load_lm(llm_dir: Path, device, dtype):
    if not (llm_dir / "config.json").is_file():
        raise CheckpointError(f"LLM directory {llm_dir} has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
    except Exception as exc:  # transformers raises several types for missing/corrupt tokenizer files
        raise CheckpointError(f"cannot load the tokenizer from {llm_dir}: {exc}") from exc
    check_supported(_read_json(llm_dir / "config.json"), llm_dir)
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype, local_files_only=True,
                                                  attn_implementation=ATTN_IMPLEMENTATION)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the causal LM from {llm_dir}: {exc}") from exc
    return lm.to(device), tokenizer


def _vision_config(vision_dir: Path):
    if not (vision_dir / "config.json").is_file():
        raise CheckpointError(f"vision directory {vision_dir} has no config.json")
    config = AutoConfig.from_pretrained(str(vision_dir), local_files_only=True)
    return getattr(config, "vision_config", config)


def _load_vision(vision_dir: Path, layout: FrameLayout, device, dtype) -> VisionEncoder:
    config = AutoConfig.from_pretrained(str(vision_dir), local_files_only=True)
    kind = config.model_type.split("_")[0]
    if kind not in ("siglip", "clip"):
        raise CheckpointError(f"vision tower in {vision_dir} is {config.model_type!r}; supported: SigLIP and CLIP")
    model_class, mean, std = (SiglipVisionModel, SIGLIP_MEAN, SIGLIP_STD) if kind == "siglip" else \
        (CLIPVisionModel, CLIP_MEAN, CLIP_STD)
    processor = vision_dir / "preprocessor_config.json"
    if processor.is_file():
        stats = _read_json(processor)
        mean, std = tuple(stats.get("image_mean", mean)), tuple(stats.get("image_std", std))
    try:
        tower = model_class.from_pretrained(str(vision_dir), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the vision tower from {vision_dir}: {exc}") from exc
    return VisionEncoder(tower, kind, layout, tower.config.image_size, mean, std).to(device)


def _load_connector(connector: torch.nn.Module, file: Path) -> None:
    if not file.is_file():
        raise CheckpointError(f"connector weights {file} are missing")
    state = load_file(str(file))
    expected = connector.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(f"{file}: {key} has shape {tuple(state[key].shape)}, the model needs "
                                  f"{tuple(tensor.shape)} (vision hidden -> LM hidden)")
    connector.load_state_dict({k: state[k] for k in expected})


def _subdir(root: Path, config: dict, key: str) -> Path:
    if not config.get(key):
        raise CheckpointError(f"{root / LIVE_CONFIG}: missing key {key!r}")
    sub = (root / config[key]).resolve()
    if not sub.is_dir():
        raise CheckpointError(f"{key} directory {sub} (from {root / LIVE_CONFIG}) does not exist")
    return sub


def _local_dir(value, root: Path, what: str, source: str, option: str) -> Path:
    if not value:
        raise CheckpointError(f"{root}: no {what} given; pass {option} (or set {source})")
    candidate = Path(value)
    if not candidate.is_absolute():
        candidate = (root / candidate) if (root / candidate).is_dir() else candidate
    if not candidate.is_dir():
        raise CheckpointError(f"{what} {value!r} (from {source} or {option}) is not a local directory; "
                              f"models are never downloaded, pass {option}")
    return candidate


def write_liveserve_layout(out: str | Path, *, lm, tokenizer, tower, mean: tuple[float, ...], std: tuple[float, ...],
                           connector: torch.nn.Module, layout: FrameLayout = FrameLayout(),
                           system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> Path:
    """Write the liveserve layout (see module docs) that `load_model` reads back; returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    tower.save_pretrained(out / "vision")
    size = tower.config.image_size
    (out / "vision" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(mean), "image_std": list(std), "size": {"height": size, "width": size}}))
    save_file({k: v.detach().contiguous() for k, v in connector.state_dict().items()}, str(out / CONNECTOR_FILE))
    (out / LIVE_CONFIG).write_text(json.dumps({
        "format": LIVE_FORMAT, "llm": "llm", "vision": "vision", "frame_cls_token": layout.cls_token,
        "frame_pooled": layout.pooled, "system_prompt": system_prompt}, indent=2))
    return out


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from exc
