"""How commentary replies pick their tokens (engine/commentary/decoding.py): StreamingVLM's seeded sampling
with a repetition penalty over the reply equals a plain implementation of the same rule on the same
logits, and a model that wants to say vision or control tokens never breaks its session."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from liveserve.config import DECODINGS, CommentaryConfig, SessionConfig
from liveserve.engine.commentary.session import CommentarySession
from liveserve.engine.commentary.decoding import ReplyDecoder
from liveserve.engine.events import ChunkDone, ResponseDone
from liveserve.engine.readout import read_out

NO_NEVER: tuple[int, ...] = ()


def sampled(temperature: float = 0.9, top_p: float = 0.8, penalty: float = 1.05, seed: int = 3,
            **commentary) -> SessionConfig:
    return SessionConfig(mode="commentary", temperature=temperature, top_p=top_p, seed=seed,
                         commentary=CommentaryConfig(repetition_penalty=penalty, **commentary))


def plain_rule(logits: list[float], reply: list[int], config: SessionConfig, never: tuple[int, ...]) -> list[float]:
    """The probabilities StreamingVLM's rule gives, written out one token at a time: never-valid tokens out,
    each token already in the reply penalized (divided when positive, multiplied when negative), scaled by
    the temperature, softmax, and only the most likely tokens whose probability before them is within top_p."""
    penalty = config.commentary.repetition_penalty
    scores = [-math.inf if i in never else (x / penalty if x > 0 else x * penalty) if i in reply else x
              for i, x in enumerate(logits)]
    scaled = [s / config.temperature for s in scores]
    top = max(scaled)
    weights = [math.exp(s - top) for s in scaled]
    total = sum(weights)
    probs = [w / total for w in weights]
    kept, before = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if before > config.top_p:
            break
        kept.add(i)
        before += probs[i]
    mass = sum(probs[i] for i in kept)
    return [probs[i] / mass if i in kept else 0.0 for i in range(len(probs))]


def test_seeded_sampling_equals_the_plain_rule_on_the_same_logits():
    """Draw after draw over a growing reply: the same distribution as the plain rule, and, from the same
    seed, the same tokens."""
    config = sampled()
    decoder = ReplyDecoder(NO_NEVER, config)
    reference = torch.Generator().manual_seed(config.seed)
    g = torch.Generator().manual_seed(11)
    reply: list[int] = []
    for _ in range(40):
        logits = torch.randn(1, 50, generator=g) * 3
        (readout,) = read_out(logits, 0)
        expected = torch.tensor(plain_rule(logits[0].tolist(), reply, config, NO_NEVER), dtype=torch.float64)
        probs = (decoder.logits(readout.logits, reply) / config.temperature).softmax(-1)
        sorted_probs, order = probs.sort(descending=True)
        nucleus = probs.scatter(0, order, sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs
                                                                   > config.top_p, 0.0))
        torch.testing.assert_close(nucleus.double() / nucleus.sum(), expected, atol=1e-6, rtol=1e-5)
        token = decoder.pick(readout, reply)
        assert token == int(torch.multinomial(expected.float(), 1, generator=reference))
        reply.append(token)
    assert len(set(reply)) > 5  # it sampled, not always the argmax


def test_the_rule_is_transformers_generate_processors_on_the_reply():
    """Repetition penalty, temperature and top-p as transformers' generate applies them, with the reply as
    the sequence so far (what StreamingVLM's loop samples with)."""
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    config = sampled(temperature=0.7, top_p=0.9, penalty=1.3)
    decoder = ReplyDecoder(NO_NEVER, config)
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(5)) * 4
    reply = [3, 9, 9, 17, int(logits.argmax())]
    scores = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([reply]), logits.clone())
    scores = TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, scores))
    ours = decoder.logits(logits[0], reply) / config.temperature
    kept = scores[0] > -math.inf
    torch.testing.assert_close(ours[kept], scores[0][kept])
    assert ours.softmax(-1)[~kept].sum() < 1 - 0.9 + 1e-6  # what top-p cuts is the tail beyond 0.9


def test_greedy_with_a_penalty_and_plain_greedy():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    (readout,) = read_out(logits, 0)
    assert ReplyDecoder(NO_NEVER, SessionConfig(mode="commentary")).pick(readout, [1]) == 1
    penalized = ReplyDecoder(NO_NEVER, sampled(temperature=0.0, penalty=1.05))
    assert penalized.pick(readout, [1]) == 2  # 5.0 / 1.05 < 4.9
    assert ReplyDecoder((1,), SessionConfig(mode="commentary")).pick(readout, []) == 2  # never said: masked
    assert DECODINGS["reference"].temperature == 0.9 and DECODINGS["reference"].repetition_penalty == 1.05
    with pytest.raises(ValueError, match="repetition_penalty"):
        CommentaryConfig(repetition_penalty=0.0)


def test_a_session_samples_by_the_rule_over_its_own_logits(qwen):
    """End to end: every token a sampling session picked is the plain rule's draw from its seed, on the
    logits of the step before it, with the reply said so far."""
    config = sampled(max_tokens_per_chunk=6)
    session = CommentarySession(qwen, config)
    session.trace = []
    g = torch.Generator().manual_seed(2)
    for i in range(8):
        session.push_frame(i * 0.5, torch.randint(0, 256, (3, qwen.frame_size, qwen.frame_size), dtype=torch.uint8,
                                                  generator=g))
    list(session.process())
    reference = torch.Generator().manual_seed(config.seed)
    never = qwen.never_said_ids()
    steps = session.trace
    reply: list[int] = []
    for (step, logits), (after, _) in zip(steps, steps[1:]):
        if step.features is not None:
            reply = []
        picked = after.ids[0]  # fed by the next step: the next reply token, or the reply's end with the next turn
        probs = torch.tensor(plain_rule(logits.tolist(), reply, config, never))
        assert picked == int(torch.multinomial(probs, 1, generator=reference))
        reply.append(picked)


def biased_to_say(qwen, tokens: list[int]):
    """A copy of the model that wants to say one of `tokens` at every step, in turn."""
    model = copy.deepcopy(qwen)
    turn = iter(range(10 ** 9))

    def hook(_module, _inputs, output):
        output[..., tokens[next(turn) % len(tokens)]] += 1e4
        return output

    model.hf.lm_head.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("config", [SessionConfig(mode="commentary", commentary=CommentaryConfig(max_tokens_per_chunk=4)),
                                    sampled(max_tokens_per_chunk=4)], ids=["greedy", "sampled"])
def test_a_model_that_wants_to_say_vision_tokens_keeps_commenting(qwen, config):
    """Biased to emit <|video_pad|>, <|image_pad|>, vision start/end, <|im_start|> and vocabulary padding:
    the session never feeds one, and goes on saying something about every chunk."""
    never = qwen.never_said_ids()
    t = qwen.template
    assert {t.video_pad, t.vision_start, t.vision_end, t.im_start} <= set(never)
    assert t.tokenizer.convert_tokens_to_ids("<|image_pad|>") in never and qwen.vocab_size - 1 in never
    model = biased_to_say(qwen, [t.video_pad, t.tokenizer.convert_tokens_to_ids("<|image_pad|>"), t.vision_start,
                                 t.vision_end, t.im_start, qwen.vocab_size - 1])
    session = CommentarySession(model, config)
    rng = random.Random(0)
    for i in range(12):
        session.push_frame(i * 0.5, torch.full((3, qwen.frame_size, qwen.frame_size), rng.randrange(256),
                                                dtype=torch.uint8))
    events = list(session.process())
    assert sum(isinstance(e, ChunkDone) for e in events) == 6 and session.failure is None
    said = [token for e in events if isinstance(e, ResponseDone) for token in e.token_ids]
    assert said and not set(said) & set(never)
    ids = session.kept_ids()
    assert ids.count(t.video_pad) == 6 * qwen.grid(2).num_tokens  # only the chunks' own pads
    assert ids.count(t.vision_start) == ids.count(t.vision_end) == 6
