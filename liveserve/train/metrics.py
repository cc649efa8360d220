"""Evaluation metrics for LIVE models, as defined by VideoLLM-online's `stream_evaluate` (pure functions).

Teacher-forced metrics are computed per turn (the decisions since the previous reply, then the reply) and
averaged per video, then over videos (`mean_over_videos`). A decision "fires" when its argmax is not the
interval id. Diffs are in frames: positive = the model fired early, negative = late, 0 = on time.

`match_decisions` scores free-running response times against annotated event times instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

TIME_EPS = 1e-9  # float slack when comparing times with tolerances


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def lm_ppl(turn_nlls: Sequence[Sequence[float]]) -> float:
    """Mean over turns of exp(mean token NLL in nats) -- a mean of per-turn PPLs, not exp of a pooled mean.
    Turns without LM tokens are skipped; NaN when no turn has any."""
    return _mean([math.exp(_mean(nlls)) for nlls in turn_nlls if len(nlls)])


def lm_correct_prefix(correct: Sequence[bool]) -> int:
    """Number of leading LM tokens whose argmax is right (the index of the first wrong one)."""
    for i, ok in enumerate(correct):
        if not ok:
            return i
    return len(correct)


def lm_correctness(correct_prefix: int, num_lm: int) -> float:
    """Share of the turn's LM tokens before the first wrong argmax; NaN for a turn without LM tokens."""
    if not 0 <= correct_prefix <= num_lm:
        raise ValueError(f"correct_prefix must be in [0, num_lm={num_lm}], got {correct_prefix}")
    return correct_prefix / num_lm if num_lm else math.nan


def _first(flags: Sequence[bool]) -> int | None:
    return next((i for i, f in enumerate(flags) if f), None)


def turn_time_diff(fires_in_turn: Sequence[bool], future_fires: Sequence[bool], is_last_turn: bool) -> int:
    """Frames between the first firing and the turn's reply frame (the turn's last stream position).

    Early (some stream position fires): len(fires_in_turn) - first firing index - 1 (0 = fired on time).
    No fire on the last turn: 0. Otherwise late: -(first firing index in the appended future frames + 1),
    or -len(future_fires) when none fires. `future_fires` is ignored on the last turn.
    """
    first = _first(fires_in_turn)
    if first is not None:
        return len(fires_in_turn) - first - 1
    if is_last_turn:
        return 0
    late = _first(future_fires)
    return -(late + 1) if late is not None else -len(future_fires)


def turn_fluency(num_stream: int, diff: int, lm_correct_prefix: int, num_lm: int) -> float:
    """Share of the turn's decisions and LM tokens that are right before the first error, N = num_stream + num_lm:
    diff 0 -> (num_stream + lm_correct_prefix) / N; early -> (num_stream - diff) / N; late -> (num_stream - 1) / N.
    (As in the reference, an early turn counts its firing position among the correct ones.)"""
    n = num_stream + num_lm
    if num_stream < 0 or num_lm < 0 or n == 0:
        raise ValueError(f"need a turn with stream positions or LM tokens, got num_stream={num_stream}, "
                         f"num_lm={num_lm}")
    if not 0 <= lm_correct_prefix <= num_lm:
        raise ValueError(f"lm_correct_prefix must be in [0, num_lm={num_lm}], got {lm_correct_prefix}")
    if diff > 0:
        if diff >= num_stream:
            raise ValueError(f"an early diff is at most num_stream - 1 = {num_stream - 1}, got {diff}")
        return (num_stream - diff) / n
    if diff < 0:
        return (num_stream - 1) / n
    return (num_stream + lm_correct_prefix) / n


def time_diff_seconds(diffs: Sequence[int], fps: float) -> float:
    """Mean |diff| over turns, in seconds (diffs are in frames); NaN when there are no turns."""
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    return _mean([abs(d) for d in diffs]) / fps


def mean_over_videos(per_video: Sequence[Sequence[float]]) -> float:
    """Mean over videos of each video's mean over turns (NaN turns and empty videos skipped)."""
    video_means = [_mean(clean) for turns in per_video if (clean := [v for v in turns if not math.isnan(v)])]
    return _mean(video_means)


@dataclass(frozen=True, slots=True)
class DecisionScores:
    """Response times matched one to one with event times (see `match_decisions`)."""

    precision: float  # matched / responses; 1.0 when there are no responses (no false alarm)
    recall: float  # matched / events; 1.0 when there are no events (nothing to find)
    f1: float  # harmonic mean of precision and recall; 0.0 when both are 0
    within_1s: float  # share of events whose matched response is 0-1 s after it; 1.0 when there are no events
    matched: int
    num_responses: int
    num_events: int
    mean_lag_s: float  # mean (response - event) over matched pairs; NaN when none matched
    pairs: tuple[tuple[float, float], ...]  # (response time, event time), in response order


def match_decisions(response_times: Sequence[float], event_times: Sequence[float],
                    tolerance_s: float = 1.0) -> DecisionScores:
    """Precision, recall and timeliness of responses against events.

    Matching is greedy and one to one in time order: each response, earliest first, takes the earliest
    still-unmatched event with |response - event| <= tolerance_s (early responses can match too).
    `within_1s` counts an event only if its matched response came 0 to 1.0 s after it.
    """
    if not tolerance_s >= 0:
        raise ValueError(f"tolerance_s must be >= 0, got {tolerance_s!r}")
    responses, events = sorted(float(r) for r in response_times), sorted(float(e) for e in event_times)
    taken = [False] * len(events)
    pairs = []
    for r in responses:
        for j, e in enumerate(events):
            if not taken[j] and abs(r - e) <= tolerance_s + TIME_EPS:
                taken[j] = True
                pairs.append((r, e))
                break
    matched = len(pairs)
    precision = matched / len(responses) if responses else 1.0
    recall = matched / len(events) if events else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    timely = sum(1 for r, e in pairs if -TIME_EPS <= r - e <= 1.0 + TIME_EPS)
    within = timely / len(events) if events else 1.0
    return DecisionScores(precision, recall, f1, within, matched, len(responses), len(events),
                          _mean([r - e for r, e in pairs]), tuple(pairs))
