"""Tiny random-weight checkpoints in the exact layouts of the real ones, for tests, the demo and benchmarks.

Everything is built from configs and a fixed seed in a second or two; nothing is downloaded. The
tokenizer is a small byte-level BPE with Llama-3's pre-tokenizer split, trained on template text, so
"," and "]\\n" are single tokens as in Llama-3.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipModel, SiglipVisionConfig,
                          SiglipVisionModel)

from liveserve.model.live import build_connector
from liveserve.model.loading import LIVE_CONFIG, write_liveserve_layout
from liveserve.model.template import DEFAULT_SYSTEM_PROMPT

BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"
# Llama-3's pre-tokenizer pattern: keeps "]\n" (punctuation + newlines) together so BPE can merge it.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_WORDS = ("red green blue yellow purple orange white black square circle triangle star ball box car person "
          "appears enters moves left right up down across the frame screen turns becomes changes colour color "
          "to from leaves disappears stops slowly quickly now there is a an of and in on at what happening "
          "see video please narrate real time describe you I it this that where how many")
# The special tokens of real tokenizers, so templates are tested against the layouts they will meet:
# Llama-3 (bos <|begin_of_text|>, turns ending <|eot_id|>, header tokens) and Qwen2 (no bos at all,
# ChatML turns ending <|im_end|>, <|endoftext|> for padding, the vision markers of Qwen2-VL).
TOKENIZER_STYLES = {
    # Llama-3's bos and eos only: the default of the tiny checkpoints the tests and demo use.
    "minimal": {"bos": BOS, "eos": EOS, "pad": EOS, "extra": [], "chat_template": None},
    "llama3": {"bos": BOS, "eos": EOS, "pad": EOS,
               "extra": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|reserved_special_token_0|>"],
               "chat_template": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                                "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"},
    "qwen2": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>",
              "extra": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
              "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}"},
}
LAYOUTS = ("liveserve", "videollm-online")
LLM_FAMILIES = ("llama", "qwen2")
VISION_FAMILIES = ("siglip", "clip")


def build_tiny_tokenizer(style: str = "minimal") -> PreTrainedTokenizerFast:
    """A small byte-level BPE with the special tokens (and chat template) of `style` (TOKENIZER_STYLES)."""
    if style not in TOKENIZER_STYLES:
        raise ValueError(f"tokenizer style must be one of {tuple(TOKENIZER_STYLES)}, got {style!r}")
    special = TOKENIZER_STYLES[style]
    bos, eos = special["bos"] or "", special["eos"]
    corpus = [f"{bos}{DEFAULT_SYSTEM_PROMPT}\n\n[<v>,<v>,<v>]\nUser: Please narrate the video in real time."
              f"\nAssistant: A red square appears.{eos}\n[<v>,<v>]\nAssistant: It moves left.{eos}\n["] * 20
    corpus += [_WORDS] * 10 + [" " + w for w in _WORDS.split()] * 5 + ["]\n[,]\n,]\n"] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tokens = [t for t in (special["bos"], eos, special["pad"], *special["extra"]) if t]
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=list(dict.fromkeys(tokens)), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special["bos"], eos_token=eos,
                                        pad_token=special["pad"], additional_special_tokens=special["extra"] or None)
    if special["chat_template"]:
        tokenizer.chat_template = special["chat_template"]
    return tokenizer


@dataclass(frozen=True, slots=True)
class TinySizes:
    """Layer sizes of a random-weight checkpoint (the defaults are the test/demo tiny model)."""

    lm_hidden: int = 64
    lm_intermediate: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    lm_kv_heads: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    patch_size: int = 8


def _lm(family: str, vocab: int, bos: int, eos: int, max_positions: int, sizes: TinySizes):
    common = dict(vocab_size=vocab, hidden_size=sizes.lm_hidden, intermediate_size=sizes.lm_intermediate,
                  num_hidden_layers=sizes.lm_layers, num_attention_heads=sizes.lm_heads,
                  num_key_value_heads=sizes.lm_kv_heads, max_position_embeddings=max_positions,
                  bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
                  rope_theta=500000.0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    raise ValueError(f"tiny LLM family must be one of {LLM_FAMILIES}, got {family!r}")


def _vision(family: str, image_size: int, full: bool, sizes: TinySizes):
    common = dict(hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_intermediate,
                  num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                  image_size=image_size, patch_size=sizes.patch_size)
    if family == "siglip":
        if full:  # google/siglip-* checkpoints are full SiglipModel (text + vision)
            text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=16)
            return SiglipModel(SiglipConfig(text_config=text, vision_config=common)), (0.5, 0.5, 0.5), \
                (0.5, 0.5, 0.5)
        return SiglipVisionModel(SiglipVisionConfig(**common)), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if family == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**common, projection_dim=sizes.vision_hidden)), \
            (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    raise ValueError(f"tiny vision family must be one of {VISION_FAMILIES}, got {family!r}")


def write_tiny_checkpoint(out_dir: str | Path, *, layout: str = "liveserve", llm: str = "llama",
                          vision: str = "siglip", seed: int = 0, image_size: int = 64,
                          max_positions: int = 131072, lora_rank: int = 8, sizes: TinySizes = TinySizes(),
                          tokenizer: str = "minimal") -> Path:
    """Write a random-weight LIVE checkpoint to `out_dir` and return the directory `load_model` takes.
    `tokenizer`: the special-token layout of its tokenizer (TOKENIZER_STYLES), e.g. "qwen2": no bos.

    layout="videollm-online" writes base/ (LLM), vision/ (full SigLIP) and adapter/ (PEFT LoRA with the
    connector in modules_to_save) and returns adapter/, whose config points at the other two.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(tokenizer)
    vocab = ((len(tokenizer) + 63) // 64) * 64
    lm = _lm(llm, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, max_positions, sizes)
    tower, mean, std = _vision(vision, image_size, layout == "videollm-online", sizes)
    vision_hidden = sizes.vision_hidden
    connector = build_connector(vision_hidden, lm.config.hidden_size)
    if layout == "liveserve":
        return write_liveserve_layout(out, lm=lm, tokenizer=tokenizer, tower=tower, mean=mean, std=std,
                                      connector=connector)
    lm.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    tower.save_pretrained(out / "vision")
    (out / "vision" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(mean), "image_std": list(std), "size": {"height": image_size, "width": image_size}}))
    return _write_adapter(out, lm, connector, vision_hidden, lora_rank)


def write_tiny_qwen2_5_vl(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A random-weight Qwen2.5-VL checkpoint in the layout StreamingVLM releases (a plain Hugging Face
    directory: config.json with model_type qwen2_5_vl, safetensors weights, a Qwen2 tokenizer with its
    vision markers and chat template, the image processor's preprocessor_config.json), about 1 MB:
    liveserve serves it in commentary mode, and Hugging Face loads and runs it as it is."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer("qwen2")
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("start", "<|vision_start|>"),
        ("end", "<|vision_end|>"))}
    special = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = Qwen2_5_VLConfig(
        # M-RoPE: head_dim 16 -> 8 rotary pairs, split over the temporal, height and width rows.
        text_config=dict(vocab_size=((len(tokenizer) + 63) // 64) * 64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=False,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **special),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"], tie_word_embeddings=False, **special)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    # StreamingVLM's frames: up to 360x640 (about 300 patches of 14 px merged 2x2); small here.
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(out)
    return out


def write_tiny_qwen2_vl(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A random-weight Qwen2-VL checkpoint in the layout Qwen2-VL-*-Instruct and LiveCC release: a plain
    Hugging Face directory whose config.json is flat as theirs is (the text model's fields at the top, the
    vision tower's `embed_dim`/`hidden_size`/`mlp_ratio` under vision_config, M-RoPE as rope_scaling),
    safetensors weights, a Qwen2 tokenizer with its vision markers, preprocessor_config.json."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer("qwen2")
    ids = {f"{name}_token_id": tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
        ("vision_end", "<|vision_end|>"))}
    release = {  # Qwen2-VL-7B-Instruct's config.json, shrunk
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **ids,
        "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128, "initializer_range": 0.02,
        "max_position_embeddings": 32768, "max_window_layers": 2, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768,
        "use_sliding_window": False, "tie_word_embeddings": False, "use_cache": True,
        "vocab_size": ((len(tokenizer) + 63) // 64) * 64,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # head_dim 16: 8 rotary pairs
        "vision_config": {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
                          "hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}
    Qwen2VLForConditionalGeneration(Qwen2VLConfig(**json.loads(json.dumps(release)))).save_pretrained(out)
    (out / "config.json").write_text(json.dumps(release, indent=2))  # the release's flat layout, not v5's nested one
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(out)
    return out


def _write_adapter(out: Path, lm, connector, vision_hidden: int, rank: int) -> Path:
    from peft import LoraConfig, get_peft_model

    lm.connector = connector
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=r"model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head$",
                        modules_to_save=["connector"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(lm, config)
    with torch.no_grad():  # a trained connector differs from the base's freshly initialised one
        for p in peft_model.base_model.model.connector.modules_to_save["default"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    adapter_dir = out / "adapter"
    peft_model.save_pretrained(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "../base"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    (adapter_dir / "config.json").write_text(json.dumps({
        "model_type": "live_llama", "vision_pretrained": "../vision", "frame_token_cls": True,
        "frame_token_pooled": [3, 3], "frame_num_tokens": 10, "frame_token_interval": ",",
        "v_placeholder": "<v>", "vision_hidden_size": vision_hidden}, indent=2))
    return adapter_dir


def tiny_checkpoint(root: str | Path | None = None) -> Path:
    """The default tiny checkpoint, written once into a cache directory and reused."""
    return _cached("tiny-live", LIVE_CONFIG, write_tiny_checkpoint, root)


def tiny_commentary_checkpoint(root: str | Path | None = None) -> Path:
    """The tiny Qwen2.5-VL checkpoint (commentary mode), written once into a cache directory and reused."""
    return _cached("tiny-qwen2_5_vl", "model.safetensors", write_tiny_qwen2_5_vl, root)


def _cached(name: str, marker: str, write, root: str | Path | None) -> Path:
    base = Path(root or os.environ.get("LIVESERVE_CACHE", Path.home() / ".cache" / "liveserve"))
    target = base / name
    if not (target / marker).is_file():
        tmp = base / f".{name}.{os.getpid()}"
        write(tmp)
        tmp.replace(target) if not target.exists() else None
    return target
