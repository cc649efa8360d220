"""Evaluation metrics on hand-computed cases: early, late and on-time triggers, PPL, fluency, decision matching."""

from __future__ import annotations

import math

import pytest

from liveserve.train.metrics import (lm_correct_prefix, lm_correctness, lm_ppl, match_decisions, mean_over_videos,
                                     time_diff_seconds, turn_fluency, turn_time_diff)

F, T = False, True


def test_lm_ppl_is_a_mean_of_turn_ppls():
    ln2 = math.log(2.0)
    # Turn PPLs: exp(ln 2) = 2 and exp(0) = 1; the empty turn is skipped -> 1.5.
    assert lm_ppl([[ln2, ln2], [0.0], []]) == pytest.approx(1.5)
    # Not exp of the pooled mean: exp(2 ln2 / 3) = 2^(2/3) ~ 1.587.
    assert lm_ppl([[ln2, ln2], [0.0]]) != pytest.approx(2 ** (2 / 3))
    assert lm_ppl([[ln2, 3 * ln2]]) == pytest.approx(4.0)  # exp(mean(ln2, 3 ln2)) = exp(2 ln2)
    assert math.isnan(lm_ppl([])) and math.isnan(lm_ppl([[]]))


def test_lm_correctness():
    assert lm_correct_prefix([T, T, F, T]) == 2 and lm_correct_prefix([T, T]) == 2 and lm_correct_prefix([F]) == 0
    assert lm_correctness(2, 4) == 0.5 and lm_correctness(4, 4) == 1.0
    assert math.isnan(lm_correctness(0, 0))
    with pytest.raises(ValueError, match="correct_prefix"):
        lm_correctness(5, 4)


def test_time_diff_early():
    # 5 stream positions, first fire at index 1: the reply was due at index 4 -> 3 frames early.
    assert turn_time_diff([F, T, F, F, T], future_fires=[T], is_last_turn=False) == 3
    assert turn_time_diff([T, F, F], future_fires=[], is_last_turn=True) == 2  # early counts on the last turn too


def test_time_diff_exact():
    assert turn_time_diff([F, F, F, T], future_fires=[F, F], is_last_turn=False) == 0
    assert turn_time_diff([T], future_fires=[], is_last_turn=False) == 0


def test_time_diff_late():
    # No fire in the turn; in the appended future frames the first fire is at index 1 -> 2 frames late.
    assert turn_time_diff([F, F, F], future_fires=[F, T, F], is_last_turn=False) == -2
    assert turn_time_diff([F, F, F], future_fires=[T], is_last_turn=False) == -1
    # Nothing fires even in the future: late by all appended frames.
    assert turn_time_diff([F, F, F], future_fires=[F, F], is_last_turn=False) == -2
    # The last turn has no future: a silent last turn counts as on time.
    assert turn_time_diff([F, F, F], future_fires=[T], is_last_turn=True) == 0


def test_fluency():
    # On time: 4 decisions right + 2 of 4 reply tokens before the first wrong one -> 6 / 8.
    assert turn_fluency(4, 0, 2, 4) == pytest.approx(0.75)
    # Early by 3 of 5 stream positions: (5 - 3) / (5 + 4).
    assert turn_fluency(5, 3, 4, 4) == pytest.approx(2 / 9)
    # Late: every silent decision right, the firing one wrong -> (3 - 1) / (3 + 4).
    assert turn_fluency(3, -2, 4, 4) == pytest.approx(2 / 7)
    assert turn_fluency(3, 0, 0, 0) == 1.0  # a trailing silent turn with no reply
    with pytest.raises(ValueError, match="early diff"):
        turn_fluency(3, 3, 0, 1)
    with pytest.raises(ValueError, match="lm_correct_prefix"):
        turn_fluency(3, 0, 2, 1)
    with pytest.raises(ValueError, match="need a turn"):
        turn_fluency(0, 0, 0, 0)


def test_time_diff_seconds_and_video_means():
    assert time_diff_seconds([3, 0, -2], fps=2.0) == pytest.approx(5 / 6)  # mean |diff| = 5/3 frames = 5/6 s
    assert math.isnan(time_diff_seconds([], fps=2.0))
    with pytest.raises(ValueError, match="fps"):
        time_diff_seconds([1], fps=0.0)
    # Per video first: video A mean 2, video B mean 5 -> 3.5 (a pooled mean over turns would be 3).
    assert mean_over_videos([[1.0, 3.0, 2.0], [5.0], []]) == pytest.approx(3.5)
    assert mean_over_videos([[math.nan, 4.0]]) == 4.0


def test_match_decisions_typical():
    s = match_decisions([1.0, 2.6, 5.0, 9.0], [1.0, 2.0, 4.5, 7.0], tolerance_s=1.0)
    # 1.0<->1.0 (lag 0), 2.6<->2.0 (0.6), 5.0<->4.5 (0.5); 9.0 is 2 s from 7.0: a false alarm, 7.0 a miss.
    assert s.pairs == ((1.0, 1.0), (2.6, 2.0), (5.0, 4.5))
    assert (s.matched, s.num_responses, s.num_events) == (3, 4, 4)
    assert s.precision == s.recall == s.f1 == 0.75
    assert s.within_1s == 0.75
    assert s.mean_lag_s == pytest.approx(1.1 / 3)


def test_match_decisions_early_late_and_greedy_order():
    early = match_decisions([0.5], [1.0])  # matched within tolerance, but before the event: not within 1 s
    assert (early.matched, early.precision, early.recall, early.within_1s) == (1, 1.0, 1.0, 0.0)
    late = match_decisions([2.5], [1.0], tolerance_s=2.0)  # matched at 1.5 s: not within 1 s
    assert (late.matched, late.within_1s) == (1, 0.0)
    edge = match_decisions([2.0], [1.0])  # exactly 1 s late: both matched and within
    assert (edge.matched, edge.within_1s) == (1, 1.0)
    # Greedy in time order: the response at 2.0 takes the earliest open event (1.2), leaving 2.0 for 2.1.
    g = match_decisions([2.1, 2.0], [2.0, 1.2])
    assert g.pairs == ((2.0, 1.2), (2.1, 2.0)) and g.within_1s == 1.0
    one = match_decisions([2.0, 2.05], [2.0])  # one to one: the second response is a false alarm
    assert (one.matched, one.precision, one.recall) == (1, 0.5, 1.0)


def test_match_decisions_conventions_for_empty_sides():
    silent = match_decisions([], [1.0, 2.0])  # no responses: no false alarm, everything missed
    assert (silent.precision, silent.recall, silent.f1, silent.within_1s) == (1.0, 0.0, 0.0, 0.0)
    assert math.isnan(silent.mean_lag_s)
    chatty = match_decisions([1.0], [])  # no events: nothing to find, every response a false alarm
    assert (chatty.precision, chatty.recall, chatty.within_1s) == (0.0, 1.0, 1.0)
    nothing = match_decisions([], [])
    assert (nothing.precision, nothing.recall, nothing.f1, nothing.within_1s) == (1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="tolerance_s"):
        match_decisions([1.0], [1.0], tolerance_s=-1.0)
