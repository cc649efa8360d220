"""Tokenizers as real checkpoints ship them: Llama-3's special tokens and chat template, Qwen2's layout
without a bos token. The stream template works with each (a session streams and replies), and LMs whose
attention or logits the engine would compute differently are refused at load, by name."""

from __future__ import annotations

import json

import pytest
import torch

from liveserve.config import SessionConfig
from liveserve.engine.events import FrameDecision, ResponseDone
from liveserve.engine.live.session import Session
from liveserve.model.checkpoint import CheckpointError
from liveserve.model.loading import load_model
from liveserve.model.template import StreamTemplate, TemplateError
from liveserve.model.tiny import TOKENIZER_STYLES, build_tiny_tokenizer, write_tiny_checkpoint


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_the_stream_template_works_with_real_special_token_layouts(style):
    tokenizer = build_tiny_tokenizer(style)
    special = TOKENIZER_STYLES[style]
    assert tokenizer.bos_token == special["bos"] and tokenizer.eos_token == special["eos"]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)  # it has one
    template = StreamTemplate.from_tokenizer(tokenizer, 10)
    start = template.start_ids("You narrate.")
    if special["bos"] is None:  # Qwen2: the stream starts with the system prompt itself
        assert tokenizer.decode(start).startswith("You narrate.")
        assert tokenizer.decode(template.first_query_ids("S", "q?")).startswith("S\n\nUser: q?")
    else:
        assert start[0] == tokenizer.bos_token_id
    assert template.eos_id == tokenizer.convert_tokens_to_ids(special["eos"])
    assert len(template.encode(",")) == 1 and template.decode(template.encode("A red square.")) == "A red square."


def test_a_tokenizer_without_eos_is_refused_by_name():
    tokenizer = build_tiny_tokenizer("qwen2")
    tokenizer.eos_token = None
    with pytest.raises(TemplateError, match="eos token"):
        StreamTemplate.from_tokenizer(tokenizer, 10)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2-tok"), llm="qwen2", tokenizer="qwen2")


def test_a_qwen2_checkpoint_with_its_own_tokenizer_streams_and_replies(qwen2_dir):
    model = load_model(qwen2_dir, device="cpu", dtype=torch.float32)
    assert model.template.bos_text == ""
    session = Session(model, SessionConfig(max_new_tokens=4, threshold=1.0))  # threshold 1: it replies
    generator = torch.Generator().manual_seed(0)
    for i in range(3):
        session.push_frame(i * 0.5, torch.randn(model.layout.num_tokens, model.vision_hidden_size,
                                                generator=generator))
    session.push_query(1.0, "what is there?")
    events = list(session.process())
    assert len([e for e in events if isinstance(e, FrameDecision)]) == 3
    assert [e for e in events if isinstance(e, ResponseDone)]
    assert session.ledger.segments[0].kind == "prefix" and session.cache.length > 0


@pytest.mark.parametrize("setting, words", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 (logit soft-capping"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
      "layer_types": ["full_attention", "sliding_attention"]}, "sliding-window attention in layers [1]"),
])
def test_lms_with_features_the_engine_lacks_are_refused_at_load(tmp_path, setting, words):
    path = write_tiny_checkpoint(tmp_path / "ckpt", llm="qwen2")
    config_file = path / "llm" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **setting}))
    with pytest.raises(CheckpointError, match="does not implement") as refused:
        load_model(path, device="cpu", dtype=torch.float32)
    assert words in str(refused.value)
