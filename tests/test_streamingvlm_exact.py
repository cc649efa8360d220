"""A commentary session's cache, token by token and position by position, against StreamingVLM's own
format written out by hand from its rules, through evictions (tiny random Qwen2.5-VL, fp32).

The reference's rules this file encodes (`reference_cache`):

1. The sink: `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>previous text\\n{previous}<|im_end|>\\n`.
2. Chunk c's user turn: `<|im_start|>user\\n` + `Time={c}.0-{c+1}.0s` + `<|vision_start|>{pads}<|vision_end|>`
   + the query (the first turn only: StreamingVLM's default, "Commentate on this match")
   + `<|im_end|>\\n<|im_start|>assistant\\n`.
3. Its reply: the generated tokens, ending with `<|im_end|>` (a reply cut at the cap is closed with one),
   then the `\\n` that closes the assistant turn. That newline belongs to the reply and leaves with it.
4. Before chunk k's turn: chunk j's reply (with its newline) and its `Time=` label leave once
   j <= k - text_rounds; its vision start, pads and end leave once j <= k - vision_window_chunks; its user
   turn's framing and query leave once both have. A leaving reply's words (without its `<|im_end|>` and
   its trailing " ..." marker) are appended to the previous text, which keeps its first
   `text_sink_tokens` and its last `text_window_tokens` tokens.
5. Positions are contiguous: transformers' `get_rope_index` over the kept tokens.

The replies are scripted (the LM head is steered to a chosen token at every step), so the reference
knows them: words ending in `<|im_end|>`, replies cut at the cap, and silent ones (only the marker).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from liveserve.config import CommentaryConfig, SessionConfig
from liveserve.engine.commentary.session import CommentarySession
from liveserve.engine.packed import forward_alone
from liveserve.engine.readout import read_out

REFERENCE_QUERY = "Commentate on this match"


@dataclass(frozen=True)
class Windows:
    chunks: int  # the stream's length
    vision_window_chunks: int = 16
    text_rounds: int = 16
    text_sink_tokens: int = 512
    text_window_tokens: int = 512


def scripted_replies(t, chunks: int, cap: int) -> list[list[int]]:
    """Chunk c's generated tokens: silent every third chunk, cut at the cap every fourth, else a few words."""
    words = t.encode(" goal pass shot save corner header cross")
    marker = list(t.no_comment)
    replies = []
    for c in range(chunks):
        if c % 3 == 2:
            replies.append(marker + [t.eos_id])
        elif c % 4 == 1:
            replies.append([words[(c + i) % len(words)] for i in range(cap)])
        else:
            replies.append([words[(c + i) % len(words)] for i in range(1 + c % 2)] + [t.eos_id])
    return replies


def reference_cache(t, system: str, grid_tokens: int, windows: Windows, replies: list[list[int]], k: int) -> list[int]:
    """What the reference's cache holds once chunk k's user turn is fed (rules 1-4 of the module)."""
    text_gone = {j for j in range(k) if j <= k - windows.text_rounds}
    vision_gone = {j for j in range(k) if j <= k - windows.vision_window_chunks}
    words = []
    for j in sorted(text_gone):
        reply = replies[j][:-1] if replies[j][-1] == t.eos_id else list(replies[j])
        if reply[-len(t.no_comment):] == list(t.no_comment):
            reply = reply[:-len(t.no_comment)]
        words += reply
    limit = windows.text_sink_tokens + windows.text_window_tokens
    if len(words) > limit:
        words = words[:windows.text_sink_tokens] + words[len(words) - windows.text_window_tokens:]
    ids = [t.im_start, *t.encode("system\n"), *t.encode(system), t.im_end, t.newline,
           t.im_start, *t.encode("previous text\n"), *words, t.im_end, t.newline]
    for j in range(k + 1):
        text, vision = j not in text_gone, j not in vision_gone
        framing = text or vision
        if framing:
            ids += [t.im_start, *t.encode("user\n")]
        if text:
            ids += t.encode(f"Time={j:.1f}-{j + 1:.1f}s")
        if vision:
            ids += [t.vision_start, *[t.video_pad] * grid_tokens, t.vision_end]
        if framing:
            ids += [*t.encode(REFERENCE_QUERY if j == 0 else ""), t.im_end, t.newline,
                    t.im_start, *t.encode("assistant\n")]
        if text and j < k:
            reply = replies[j] if replies[j][-1] == t.eos_id else replies[j] + [t.eos_id]
            ids += [*reply, t.newline]
    return ids


def rope_rows(qwen, ids: list[int]) -> torch.Tensor:
    """transformers' own M-RoPE positions [3, n] of `ids` (rule 5)."""
    x = torch.tensor(ids)[None]
    grid = qwen.grid(2)
    chunks = ids.count(qwen.template.vision_start)
    rows, _ = qwen.hf.model.get_rope_index(x, (x == qwen.template.video_pad).long() * 2,
                                           video_grid_thw=torch.tensor([[grid.t, 2 * grid.h, 2 * grid.w]] * chunks),
                                           second_per_grid_ts=torch.tensor([1.0] * chunks))
    return rows[:, 0]


def steered(qwen, picks: list[int]):
    """A copy of the model whose every forward's next token is the next of `picks`."""
    model = copy.deepcopy(qwen)
    script = iter(picks)

    def hook(_module, _inputs, output):
        output[..., next(script)] += 1e4
        return output

    model.hf.lm_head.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("windows", [
    Windows(chunks=40),  # the defaults: turns leave from chunk 16 on
    Windows(chunks=24, vision_window_chunks=3, text_rounds=3, text_sink_tokens=4, text_window_tokens=6),
    Windows(chunks=20, vision_window_chunks=5, text_rounds=2, text_sink_tokens=3, text_window_tokens=5),
    Windows(chunks=20, vision_window_chunks=2, text_rounds=4, text_sink_tokens=3, text_window_tokens=5),
], ids=["default", "equal", "vision-longer", "text-longer"])
def test_the_cache_is_streamingvlms_token_by_token_and_position_by_position(qwen, windows):
    cap = max(4, len(qwen.template.no_comment) + 1)
    overrides = {name: getattr(windows, name) for name in ("vision_window_chunks", "text_rounds", "text_sink_tokens",
                                                            "text_window_tokens")}
    config = SessionConfig(mode="commentary", commentary=CommentaryConfig(max_tokens_per_chunk=cap, **overrides))
    t = qwen.template
    replies = scripted_replies(t, windows.chunks, cap)
    model = steered(qwen, [token for reply in replies for token in reply])
    session = CommentarySession(model, config)
    image = torch.randint(0, 256, (3, qwen.frame_size, qwen.frame_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(4))
    for c in range(windows.chunks):
        session.push_frame(c, image)
        session.push_frame(c + 0.5, image)
    grid_tokens = qwen.grid(2).num_tokens
    chunk, evicted = 0, False
    while (step := session.plan()) is not None:
        turn = step.features is not None
        session.complete(read_out(forward_alone(model, session.cache, step), t.interval_id)[0])
        if not turn:
            continue
        expected = reference_cache(t, model.system_prompt, grid_tokens, windows, replies, chunk)
        assert session.kept_ids() == expected, f"chunk {chunk}"
        rows = rope_rows(qwen, expected)
        assert session.cache.kept_positions().tolist() == rows[0].tolist(), f"chunk {chunk}"
        assert step.positions.tolist() == rows[:, -step.num_tokens:].tolist(), f"chunk {chunk}"
        evicted = evicted or session.last_keep is not None
        chunk += 1
    assert chunk == windows.chunks and evicted
