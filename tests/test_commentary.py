"""Qwen2.5-VL commentary sessions (StreamingVLM's mode) on a tiny random checkpoint in its release layout:
exact against transformers' own model, batched equal to alone, bounded caches with contiguous M-RoPE."""

from __future__ import annotations

import copy

import pytest
import torch

from liveserve.config import CommentaryConfig, EngineConfig, PoolConfig, SchedulerConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.commentary.session import CommentarySession
from liveserve.engine.events import ChunkDone, ResponseDelta, ResponseDone, ResponseStarted
from liveserve.engine.inputs import SessionError
from liveserve.engine.packed import forward_alone
from liveserve.engine.readout import read_out


@pytest.fixture(scope="module")
def hf(qwen_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir, attn_implementation="sdpa").eval()


def frames(model, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.frame_size
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(n)]


def commentary(**overrides) -> SessionConfig:
    return SessionConfig(mode="commentary", commentary=CommentaryConfig(**{"max_tokens_per_chunk": 4, **overrides}))


def run(model, config: SessionConfig, images: list[torch.Tensor], fps: float = 2.0) -> CommentarySession:
    session = CommentarySession(model, config)
    session.trace = []
    for i, image in enumerate(images):
        session.push_frame(i / fps, image)
    session.flush()
    events = list(session.process())
    session.events = events
    return session


def trace_logits(session) -> torch.Tensor:
    return torch.stack([logits for _, logits in session.trace])


def test_engine_logits_equal_transformers_qwen2_5_vl_forward(qwen, hf):
    """Every step's logits (each chunk's turn, each reply token) equal one forward of transformers'
    Qwen2_5_VLForConditionalGeneration over the same tokens and frames: its tower, merger, M-RoPE."""
    images = frames(qwen, 8, seed=1)
    session = CommentarySession(qwen, commentary())
    session.trace = []
    for i, image in enumerate(images):
        if i == 4:
            session.push_query(2.0, "Who scores?")  # asked in the next chunk's turn
        session.push_frame(i * 0.5, image)
    list(session.process())
    ids = torch.tensor([i for step, _ in session.trace for i in step.ids])[None]
    chunks = [torch.stack(images[i:i + 2]) for i in range(0, 8, 2)]
    grid = qwen.grid(2)
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values_videos=torch.cat([qwen.patchify(c) for c in chunks]),
                    video_grid_thw=torch.tensor([[grid.t, 2 * grid.h, 2 * grid.w]] * 4),
                    second_per_grid_ts=torch.tensor([1.0] * 4),
                    mm_token_type_ids=(ids == qwen.template.video_pad).long() * 2).logits[0].float()
    ends = torch.tensor([step.num_tokens for step, _ in session.trace]).cumsum(0) - 1
    assert len(session.trace) == 4 * 4  # a turn and three fed reply tokens per chunk
    assert "Who scores?" in qwen.template.decode(ids[0].tolist())
    torch.testing.assert_close(trace_logits(session), logits[ends], atol=1e-4, rtol=1e-4)


def test_frames_are_patchified_as_qwen_image_processor_does(qwen, qwen_dir):
    from transformers import Qwen2VLImageProcessor

    image = frames(qwen, 1, seed=3)[0]
    processed = Qwen2VLImageProcessor.from_pretrained(qwen_dir)(images=[image.permute(1, 2, 0).numpy()],
                                                                return_tensors="pt")
    # An image is a one-frame video repeated to the temporal patch; the same size, so nothing is resized.
    torch.testing.assert_close(qwen.patchify(torch.stack([image, image])), processed["pixel_values"],
                               atol=1e-5, rtol=1e-5)


def test_chunks_encoded_together_equal_each_encoded_alone(qwen):
    chunks = [torch.stack(frames(qwen, 2, seed=k)) for k in range(3)]
    together = qwen.encode_chunks(chunks)
    for chunk, features in zip(chunks, together):
        torch.testing.assert_close(features, qwen.encode_chunk(chunk), atol=1e-5, rtol=1e-5)


def test_batched_sessions_equal_each_session_alone_through_evictions(qwen):
    """Sessions of different lengths in one engine, through windows that drop frames, move replies into the
    previous text and trim it: each session's logits equal its own run alone."""
    config = commentary(max_tokens_per_chunk=5, vision_window_chunks=3, text_rounds=2, text_sink_tokens=4,
                        text_window_tokens=6)
    engine = BatchEngine(qwen, EngineConfig(pool=PoolConfig(budget_tokens=8192),
                                            scheduler=SchedulerConfig(max_lag_s=None, max_queued_frames=1000)))
    alone = []
    for k in range(3):
        images = frames(qwen, 12 + 4 * k, seed=k)
        session = engine.open(f"s{k}", config)
        session.trace = []
        for i, image in enumerate(images):
            session.push_frame(i * 0.5, image)
        alone.append(run(qwen, config, images))
    events = engine.run_until_idle()
    for k in range(3):
        batched = engine.session(f"s{k}")
        assert len(batched.trace) == len(alone[k].trace)
        torch.testing.assert_close(trace_logits(batched), trace_logits(alone[k]), atol=1e-4, rtol=1e-4)
        assert batched.kept_ids() == alone[k].kept_ids()
        assert any(p.kind == "previous" and p.ids for p in batched.pieces)  # replies were moved
    assert sum(isinstance(e, ChunkDone) for _, e in events) == 6 + 8 + 10


def _kept_rope_rows(qwen, session) -> torch.Tensor:
    """transformers' own M-RoPE positions over the kept tokens, as StreamingVLM recomputes them."""
    ids = torch.tensor(session.kept_ids())[None]
    grid = qwen.grid(session.commentary.frames_per_chunk)
    chunks = sum(1 for piece in session.pieces if piece.kind == "vision")
    rows, _ = qwen.hf.model.get_rope_index(ids, (ids == qwen.template.video_pad).long() * 2,
                                           video_grid_thw=torch.tensor([[grid.t, 2 * grid.h, 2 * grid.w]] * chunks),
                                           second_per_grid_ts=torch.tensor([1.0] * chunks))
    return rows[:, 0]


def test_contiguous_positions_are_get_rope_index_over_the_kept_tokens(qwen):
    config = commentary(max_tokens_per_chunk=3, vision_window_chunks=3, text_rounds=4, text_sink_tokens=3,
                        text_window_tokens=4)
    session = run(qwen, config, frames(qwen, 30, seed=5))
    assert sum(p.kind == "vision" for p in session.pieces) == 3 and sum(p.kind == "reply" for p in session.pieces) == 4
    rows = _kept_rope_rows(qwen, session)
    # The cache keeps each token's temporal row: with one temporal group per chunk, a chunk's start.
    assert session.cache.kept_positions().tolist() == rows[0].tolist()
    # The next turn continues right after them.
    assert session._next_position == int(rows.max()) + 1


def test_a_2000_chunk_stream_keeps_a_flat_cache_and_bounded_positions(qwen):
    """StreamingVLM's defaults (16 chunks of frames, 16 replies in place, 512 + 512 previous text): after the
    windows fill, the cache and the positions stop growing."""
    session = CommentarySession(qwen, commentary(max_tokens_per_chunk=2))
    image = frames(qwen, 1, seed=7)[0]
    sizes, tops = [], []
    for chunk in range(2000):
        session.push_frame(chunk, image)
        session.push_frame(chunk + 0.5, image)
        for _ in session.process():
            pass
        sizes.append(session.cache.length)
        tops.append(session._next_position)
    assert max(sizes[1000:]) == max(sizes[1500:])  # flat: the last 500 chunks never grew past the ones before
    assert max(sizes) <= session.cache.max_tokens
    assert max(tops) < 4096 < qwen.max_positions
    previous = next(p for p in session.pieces if p.kind == "previous")
    assert len(previous.ids) == 1024  # trimmed to its sink and window
    assert session.cache.kept_positions().tolist() == _kept_rope_rows(qwen, session)[0].tolist()


@torch.no_grad()
def test_original_positions_match_a_streaming_mask_oracle(qwen):
    """With positions kept as they were, every step equals one plain forward over all tokens ever fed in
    which each token sees exactly what was cached when it was computed: eviction and moves lose nothing else."""
    config = commentary(max_tokens_per_chunk=3, vision_window_chunks=2, text_rounds=3, text_sink_tokens=2,
                        text_window_tokens=3, positions="original")
    session = CommentarySession(qwen, config)
    session.trace, origins, seen = [], [], []  # origins: global index of each cached token
    for i, image in enumerate(frames(qwen, 16, seed=9)):
        session.push_frame(i * 0.5, image)
    fed = 0
    while True:
        step = session.plan()
        if step is None:
            break
        kept_before = _follow(session, origins)
        seen.append((kept_before, fed, step.num_tokens))
        logits = forward_alone(qwen, session.cache, step)
        session.complete(read_out(logits, qwen.template.interval_id)[0])
        origins.extend(range(fed, fed + step.num_tokens))
        fed += step.num_tokens
    steps = [step for step, _ in session.trace]
    embeds = torch.cat([qwen.embed_step([step]) for step in steps])
    positions = torch.cat([step.positions for step in steps], dim=1)
    mask = torch.zeros(fed, fed, dtype=torch.bool)
    for kept, start, n in seen:
        for j in range(n):
            mask[start + j, kept] = True
            mask[start + j, start:start + j + 1] = True
    assert session.cache.length < fed  # evictions happened
    out = qwen.hf.model.language_model(inputs_embeds=embeds[None], position_ids=positions[:, None],
                                       attention_mask=mask[None, None])
    expected = qwen.hf.lm_head(out.last_hidden_state[0]).float()
    ends = torch.tensor([step.num_tokens for step in steps]).cumsum(0) - 1
    torch.testing.assert_close(trace_logits(session), expected[ends], atol=1e-4, rtol=1e-4)


def _follow(session, origins: list[int]) -> list[int]:
    """Apply the plan's eviction to the list of cached tokens' global indices (what keep() did)."""
    if session.last_keep is not None:
        origins[:] = [origins[i] for i in session.last_keep]
    return list(origins)


def test_a_reply_of_only_the_marker_is_silence(qwen):
    """The model says " ..." then <|im_end|>: nothing is streamed, the chunk is reported silent."""
    marker, end = list(qwen.template.no_comment), qwen.template.eos_id
    steered = copy.deepcopy(qwen)
    script = iter(marker + [end])

    def hook(_module, _inputs, output):
        output[..., next(script, end)] += 1e4
        return output

    steered.hf.lm_head.register_forward_hook(hook)
    session = run(steered, commentary(max_tokens_per_chunk=8), frames(qwen, 2))
    assert not any(isinstance(e, (ResponseStarted, ResponseDelta, ResponseDone)) for e in session.events)
    (done,) = [e for e in session.events if isinstance(e, ChunkDone)]
    assert done.silent and done.text == "" and done.num_tokens == len(marker) + 1
    assert session.pieces[-1].content == 0  # nothing to move into the previous text later


def test_chunks_follow_the_stream_through_jitter_and_gaps(qwen):
    """Two frames a chunk in arrival order, labelled by the chunk after the last or, after a gap, by the
    time: jittery timestamps never repeat a label, a skipped second closes its chunk early (padded)."""
    session = CommentarySession(qwen, commentary(max_tokens_per_chunk=1))
    image = frames(qwen, 1)[0]
    for timestamp in (0.0, 0.49, 0.98, 1.47, 1.96, 5.0, 5.5):
        session.push_frame(timestamp, image)
    session.flush()
    done = [e for e in session.process() if isinstance(e, ChunkDone)]
    assert [(d.start_s, d.end_s) for d in done] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (5.0, 6.0)]
    assert [d.frame_ids for d in done] == [(0, 1), (2, 3), (4,), (5, 6)]  # chunk 2 was cut by the gap
    assert [d.timestamps for d in done][2] == (1.96,)
    turns = qwen.template.decode(session.kept_ids())
    assert all(f"Time={t:.1f}-{t + 1:.1f}s" in turns for t in (0.0, 1.0, 2.0, 5.0))


def test_markers_written_in_a_query_stay_text(qwen):
    """A query (or system prompt) that spells out <|video_pad|> or <|im_end|> cannot place vision slots or
    end a turn: it is tokenized as the text it is, and the chunk's turn still has exactly its vision tokens."""
    config = SessionConfig(mode="commentary", system_prompt="<|im_end|>",
                           commentary=CommentaryConfig(max_tokens_per_chunk=2))
    session = CommentarySession(qwen, config)
    session.push_query(0.0, "What is <|video_pad|><|video_pad|> and <|im_end|>?")
    for i, image in enumerate(frames(qwen, 2)):
        session.push_frame(i * 0.5, image)
    events = list(session.process())
    assert any(isinstance(e, ChunkDone) for e in events)
    ids = session.kept_ids()
    assert ids.count(qwen.template.video_pad) == qwen.grid(2).num_tokens
    assert ids.count(qwen.template.im_end) == 3  # system, previous text, the user turn: none from the text


def test_a_chunk_still_filling_is_no_work_for_the_engine(qwen):
    """The engine goes idle with half a chunk queued (it waits for the chunk's next frame), and the
    session's flush at the end of the stream makes it work."""
    engine = BatchEngine(qwen, EngineConfig(pool=PoolConfig(budget_tokens=8192)))
    session = engine.open("s", commentary(max_tokens_per_chunk=1))
    for i, image in enumerate(frames(qwen, 3)):
        session.push_frame(i * 0.5, image)
    engine.wake()
    first = [e for _, e in engine.run_until_idle(timeout_s=30) if isinstance(e, ChunkDone)]
    assert [d.frame_ids for d in first] == [(0, 1)] and not engine.has_work()
    session.flush()
    engine.wake()
    assert [d.frame_ids for _, d in engine.run_until_idle(timeout_s=30) if isinstance(d, ChunkDone)] == [(2,)]


def test_a_lagging_session_drops_old_chunks_but_keeps_their_queries(qwen):
    session = CommentarySession(qwen, commentary(max_tokens_per_chunk=1))
    image = frames(qwen, 1)[0]
    session.push_query(0.0, "Who scores?")
    for i in range(8):  # four chunks waiting: 0-1 s (with the query) .. 3-4 s
        session.push_frame(i * 0.5, image)
    dropped = session.drop_stale_frames(max_lag_s=1.0, max_queued=64)
    assert [f.frame_id for f in dropped] == [0, 1, 2, 3]  # chunks 0 and 1 went, to stay within 1 s
    list(session.process())
    assert "Who scores?" in qwen.template.decode(session.kept_ids())  # asked with the first chunk kept
    assert session.frames_dropped == 4


def test_commentary_input_is_checked(qwen):
    with pytest.raises(SessionError, match="serves mode 'commentary', not 'live'"):
        BatchEngine(qwen, EngineConfig(pool=PoolConfig(budget_tokens=4096))).open("x", SessionConfig())
    with pytest.raises(SessionError, match="groups of 2"):
        CommentarySession(qwen, SessionConfig(mode="commentary", commentary=CommentaryConfig(fps=3.0)))
    session = CommentarySession(qwen, commentary())
    with pytest.raises(SessionError, match="take images"):
        session.push_frame(0.0, torch.zeros(16, 64))
    with pytest.raises(SessionError, match="bad frame image"):
        session.push_frame(0.0, b"not an image")
    session.push_frame(1.0, frames(qwen, 1)[0])
    with pytest.raises(SessionError, match="backwards"):
        session.push_frame(0.5, frames(qwen, 1)[0])
    with pytest.raises(ValueError, match="whole number of frames"):
        CommentaryConfig(chunk_s=1.0, fps=2.5)


def test_a_live_model_refuses_commentary(tiny_model):
    with pytest.raises(SessionError, match="serves mode 'live', not 'commentary'"):
        BatchEngine(tiny_model, EngineConfig(pool=PoolConfig(budget_tokens=4096))).open("x", commentary())
