"""The streaming engine against exact references: full forwards, a plain decision loop, and a
streaming-mask oracle for eviction."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine_helpers import frame_bank, steered, streaming_mask_oracle
from liveserve.config import CacheConfig, SessionConfig
from liveserve.engine.events import FrameDecision, ResponseDelta, ResponseDone, ResponseStarted
from liveserve.engine.kv_pool import CacheFullError, KVPool
from liveserve.engine.packed import PackedStep, private_cache
from liveserve.engine.live.session import Session, SessionError


@pytest.fixture(scope="module")
def mixed_model(tiny_model):
    """P(silent) near 0.5, so a 0.5 threshold gives a mix of silent frames and replies."""
    return steered(tiny_model, interval_bias=8.0, eos_bias=7.8)


def _drain(session):
    return list(session.process())


def test_incremental_equals_one_full_forward_across_replies_and_queries(mixed_model):
    session = Session(mixed_model, SessionConfig(threshold=0.5, max_new_tokens=4))
    session.trace = []
    session.push_query(0.0, "Please narrate the video in real time.")
    for i, features in enumerate(frame_bank(mixed_model, 12)):
        if i == 7:
            session.push_query(3.2, "What is happening?")
        session.push_frame(i * 0.5, features)
    events = _drain(session)
    assert sum(isinstance(e, ResponseDone) for e in events) >= 3  # replies and queries really happened
    assert any(isinstance(e, FrameDecision) and e.action == "silent" for e in events)
    embeds = torch.cat([t.embeds for t in session.trace])
    with torch.no_grad():
        full = mixed_model.lm(inputs_embeds=embeds[None]).logits[0].float()
    ends = torch.tensor([int(t.positions[-1]) for t in session.trace])
    incremental = torch.stack([t.logits for t in session.trace])
    assert session.cache.length == embeds.shape[0]  # nothing was ever recomputed or dropped
    torch.testing.assert_close(incremental, full[ends], atol=1e-4, rtol=1e-4)


def _reference_decisions(model, frames, threshold, max_new_tokens):
    """The obviously-correct loop: rebuild the whole token sequence and run it from scratch every time."""
    tok = model.template.tokenizer
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    interval, eos = model.template.interval_id, model.template.eos_id
    sequence: list[torch.Tensor] = []
    last_logits = lambda: model.lm(inputs_embeds=torch.cat(sequence)[None]).logits[0, -1].float()  # noqa: E731
    pending = enc(tok.bos_token + model.system_prompt + "\n\n[")
    decisions, replies = [], []
    with torch.no_grad():
        for features in frames:
            sequence += [model.embed_ids(pending), model.embed_frames(features[None])]
            probs = last_logits().softmax(-1)
            p_silent = float(probs[interval])
            if p_silent < threshold:
                probs[interval] = 0
            choice = int(probs.argmax())
            decisions.append((p_silent, choice != interval))
            if choice == interval:
                pending = [interval]
                continue
            sequence.append(model.embed_ids(enc("]\nAssistant:")))
            reply = []
            while True:
                reply.append(int(last_logits().argmax()))
                if reply[-1] == eos or len(reply) == max_new_tokens:
                    break
                sequence.append(model.embed_ids([reply[-1]]))
            replies.append(reply)
            pending = ([eos] if reply[-1] == eos else [reply[-1], eos]) + enc("\n[")
    return decisions, replies


def test_decisions_and_replies_equal_a_plain_reference_loop(mixed_model):
    frames = frame_bank(mixed_model, 14, seed=3)
    expected_decisions, expected_replies = _reference_decisions(mixed_model, frames, 0.5, 3)
    session = Session(mixed_model, SessionConfig(threshold=0.5, max_new_tokens=3))
    for i, features in enumerate(frames):
        session.push_frame(i * 0.5, features)
    events = _drain(session)
    decisions = [(e.p_silent, e.fired) for e in events if isinstance(e, FrameDecision)]
    replies, current = [], []
    for e in events:
        if isinstance(e, ResponseDelta):
            current += e.token_ids
        elif isinstance(e, ResponseDone):
            replies.append(e.num_tokens)
            current = []
    assert [f for _, f in decisions] == [f for _, f in expected_decisions]
    assert any(f for _, f in decisions) and not all(f for _, f in decisions)
    for (p, _), (q, _) in zip(decisions, expected_decisions):
        assert p == pytest.approx(q, abs=1e-5)
    assert replies == [len(r) for r in expected_replies]


@pytest.mark.parametrize("window,evict,text_window", [(3, 1, 0), (4, 2, 12), (2, 2, 30)])
def test_sink_window_eviction_matches_streaming_mask_oracle(mixed_model, window, evict, text_window):
    cache = CacheConfig(policy="sink_window", positions="original", window_frames=window, evict_frames=evict,
                        text_window_tokens=text_window)
    session = Session(mixed_model, SessionConfig(threshold=0.5, max_new_tokens=3, cache=cache))
    session.trace = []
    session.push_query(0.0, "Please narrate the video in real time.")
    for i, features in enumerate(frame_bank(mixed_model, 16, seed=window)):
        if i == 9:
            session.push_query(4.2, "What is happening?")
        session.push_frame(i * 0.5, features)
    _drain(session)
    total = sum(t.embeds.shape[0] for t in session.trace)
    assert session.cache.length < total  # evictions really happened
    expected = streaming_mask_oracle(mixed_model, session.trace)
    torch.testing.assert_close(torch.stack([t.logits for t in session.trace]), expected, atol=1e-4, rtol=1e-4)


def test_contiguous_eviction_rerotates_kept_keys_exactly(tiny_model):
    rotary = tiny_model.lm.model.rotary_emb
    heads, n, dim = tiny_model.num_kv_heads, 40, tiny_model.head_dim
    raw = torch.randn(1, heads, n, dim, dtype=torch.float64)

    def rope(keys, positions):
        cos, sin = rotary(keys.float(), positions[None])
        return apply_rotary_pos_emb(keys, keys, cos.double(), sin.double())[1]

    pool = KVPool(num_layers=1, num_kv_heads=heads, head_dim=dim, dtype=torch.float64, device="cpu",
                  budget_tokens=64, block_size=8)
    cache = pool.open_cache(64)
    cache.reserve(n)
    slots = cache.slots(0, n)  # the pool's layout: [layers, slots, kv_heads, dim]
    pool.keys[0, slots] = rope(raw, torch.arange(1000, 1000 + n))[0].transpose(0, 1)  # rotated far from 0 on purpose
    pool.values[0, slots] = raw[0].transpose(0, 1)
    cache.commit(torch.arange(1000, 1000 + n))
    keep = torch.tensor([0, 1, 2, 3, 17, 18, 30, 31, 32, 39])
    cache.keep(keep, tiny_model.inv_freq)
    assert cache.kept_positions().tolist() == list(range(len(keep)))
    expected = rope(raw[:, :, keep], torch.arange(len(keep)))[0].transpose(0, 1)
    kept = cache.slots(0, cache.length)
    torch.testing.assert_close(pool.keys[0, kept], expected, atol=1e-4, rtol=0)  # cos/sin are fp32
    torch.testing.assert_close(pool.values[0, kept], raw[0, :, keep].transpose(0, 1))


def test_relative_positions_make_rebasing_exact_at_every_depth(mixed_model):
    """What contiguous positions rely on: the same tokens at positions c.. give the logits they give at 0.."""
    embeds = torch.cat([mixed_model.embed_frames(f[None]) for f in frame_bank(mixed_model, 5)])

    def run(offset):
        cache = private_cache(mixed_model, 256)
        outs = []
        for chunk in embeds.split(10):
            cache.reserve(len(chunk))
            positions = torch.arange(cache.length, cache.length + len(chunk)) + offset
            packed = PackedStep(cache.pool, [(cache, len(chunk))])
            with torch.no_grad():
                outs.append(mixed_model.forward_step(chunk, positions, packed, packed.last_index))
            cache.commit(positions)
        return torch.cat(outs)

    torch.testing.assert_close(run(0), run(3000), atol=2e-4, rtol=1e-4)


def test_sink_window_memory_stays_flat_over_10000_frames(tiny_model):
    model = steered(tiny_model, interval_bias=100.0)  # a silent stream: only frames accumulate
    cache = CacheConfig(policy="sink_window", window_frames=16, evict_frames=4)
    session = Session(model, SessionConfig(cache=cache))
    bank = frame_bank(model, 8)
    sizes = {}
    for i in range(10_000):
        session.push_frame(i * 0.5, bank[i % 8])
        for event in session.process():
            assert not event.fired
        if i + 1 in (100, 1000, 10_000):
            sizes[i + 1] = (session.cache.nbytes, session.cache.capacity, len(session.ledger.segments))
        assert session.cache.length <= session.cache.max_tokens
    assert sizes[100] == sizes[1000] == sizes[10_000]
    assert int(session.cache.positions[: session.cache.length].max()) < session.cache.length  # contiguous


def test_full_policy_refuses_cleanly_before_the_position_limit(tmp_path):
    from liveserve.model.loading import load_model
    from liveserve.model.tiny import write_tiny_checkpoint

    model = steered(load_model(write_tiny_checkpoint(tmp_path / "m", max_positions=96), device="cpu"),
                    interval_bias=100.0)
    session = Session(model, SessionConfig())
    bank = frame_bank(model, 10)
    with pytest.raises(CacheFullError, match="sink_window"):
        for i in range(10):
            session.push_frame(i * 0.5, bank[i])
            _drain(session)
    assert session.cache.length == session.ledger.num_tokens <= 96
    assert int(session.cache.positions[: session.cache.length].max()) < 96


def test_sink_window_that_cannot_fit_the_model_is_refused_at_creation(tmp_path):
    from liveserve.model.loading import load_model
    from liveserve.model.tiny import write_tiny_checkpoint

    model = load_model(write_tiny_checkpoint(tmp_path / "m", max_positions=256), device="cpu")
    with pytest.raises(ValueError, match="positions"):
        Session(model, SessionConfig(cache=CacheConfig(policy="sink_window", window_frames=64)))


def test_frames_arriving_during_a_reply_are_processed_after_it_in_order(mixed_model):
    model = steered(mixed_model, interval_bias=-100.0, eos_bias=-100.0)  # always respond, full-length replies
    session = Session(model, SessionConfig(threshold=0.0, max_new_tokens=5))
    bank = frame_bank(model, 4)
    session.push_frame(0.0, bank[0])
    order = []
    for event in session.process():
        order.append(type(event).__name__ + (f"@{event.timestamp}" if isinstance(event, FrameDecision) else ""))
        if isinstance(event, ResponseStarted) and event.timestamp == 0.0:
            for i in (1, 2, 3):  # the camera keeps going while the model talks
                session.push_frame(i * 0.5, bank[i])
    decisions = [o for o in order if o.startswith("FrameDecision")]
    assert decisions == ["FrameDecision@0.0", "FrameDecision@0.5", "FrameDecision@1.0", "FrameDecision@1.5"]
    first_done = order.index("ResponseDone")
    assert order.index("FrameDecision@0.5") > first_done


def test_an_argmax_that_is_neither_interval_nor_respond_fires_without_crashing(tiny_model):
    session = Session(tiny_model, SessionConfig(threshold=0.0, max_new_tokens=2))
    session.push_frame(0.0, frame_bank(tiny_model, 1)[0])
    decision = next(e for e in session.process() if isinstance(e, FrameDecision))
    template = tiny_model.template
    assert decision.token_id not in (template.interval_id, template.respond_id)
    assert decision.fired and decision.action == "respond"


def test_query_at_a_frame_time_preempts_that_frames_decision(mixed_model):
    session = Session(mixed_model, SessionConfig(max_new_tokens=2))
    bank = frame_bank(mixed_model, 2)
    session.push_frame(0.0, bank[0])
    session.push_query(0.0, "What is happening?")
    events = _drain(session)
    assert isinstance(events[0], FrameDecision) and events[0].action == "query" and not events[0].fired
    assert isinstance(events[1], ResponseStarted) and events[1].trigger == "query"


@pytest.mark.parametrize("push,message", [
    (lambda s, f: s.push_frame(0.2, f), "backwards"),
    (lambda s, f: s.push_frame(2.0, f[:5]), "shape"),
    (lambda s, f: s.push_frame(2.0, f * float("nan")), "NaN"),
    (lambda s, f: s.push_frame(float("inf"), f), "finite"),
    (lambda s, f: s.push_frame(2.0, "pixels"), "image or a features"),
    (lambda s, f: s.push_frame(2.0, torch.zeros(3, 4, 5, 6, dtype=torch.uint8)), "bad frame image"),
    (lambda s, f: s.push_query(2.0, "   "), "empty"),
    (lambda s, f: s.push_query(2.0, "word " * 400), "limit"),
    (lambda s, f: s.push_query(-1, "hi"), ">= 0"),
])
def test_bad_input_is_refused_and_the_session_goes_on(mixed_model, push, message):
    session = Session(mixed_model, SessionConfig(max_new_tokens=2))
    bank = frame_bank(mixed_model, 3)
    session.push_frame(1.0, bank[0])
    _drain(session)
    before = session.cache.length
    with pytest.raises(SessionError, match=message):
        push(session, bank[1])
    assert session.cache.length == before and session.backlog == 0
    session.push_frame(3.0, bank[2])
    assert any(isinstance(e, FrameDecision) for e in _drain(session))


def test_pushing_from_another_thread_while_processing_loses_nothing(mixed_model):
    session = Session(mixed_model, SessionConfig(max_new_tokens=2))
    bank = frame_bank(mixed_model, 40)

    def producer():
        for i, features in enumerate(bank):
            session.push_frame(i * 0.5, features)

    thread = threading.Thread(target=producer)
    thread.start()
    seen = []
    while thread.is_alive() or session.backlog:
        seen += [e.frame_index for e in session.process() if isinstance(e, FrameDecision)]
    thread.join()
    seen += [e.frame_index for e in session.process() if isinstance(e, FrameDecision)]
    assert seen == list(range(40))


def test_sampled_replies_are_reproducible_by_seed(tiny_model):
    def reply(seed):
        session = Session(tiny_model, SessionConfig(threshold=1.0, max_new_tokens=12, temperature=1.0, top_p=0.9,
                                                    seed=seed))
        session.push_frame(0.0, frame_bank(tiny_model, 1)[0])
        return next(e.text for e in session.process() if isinstance(e, ResponseDone))

    greedy = Session(tiny_model, SessionConfig(threshold=1.0, max_new_tokens=12))
    greedy.push_frame(0.0, frame_bank(tiny_model, 1)[0])
    greedy_text = next(e.text for e in greedy.process() if isinstance(e, ResponseDone))
    assert reply(1) == reply(1)
    assert len({reply(1), reply(2), reply(3), greedy_text}) > 1


def test_a_closed_session_refuses_input(tiny_model):
    session = Session(tiny_model, SessionConfig())
    session.close()
    with pytest.raises(SessionError, match="closed"):
        session.push_frame(0.0, frame_bank(tiny_model, 1)[0])
    with pytest.raises(SessionError, match="closed"):
        session.push_query(0.0, "hi")
