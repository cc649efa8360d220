"""From per-session measurements to one typed report per load level, and the capacity of a sweep.

Percentiles are nearest-rank (the same definition as `liveserve bench`): every reported value is one
that was actually observed, and p99 of 100 samples is the 99th smallest, not an interpolation.
SLO attainment counts against every frame the client was scheduled to send, so a frame the server
dropped, never decided, or could not be sent because its session was refused is a miss, not a
silently smaller denominator.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liveserve.loadtest.session import SessionRecord

TIMELINE_MAX_POINTS = 300  # latency-over-time buckets; wider than 1 s on long runs


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty, ascending sequence."""
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of a set of durations, in milliseconds; None when there were no samples."""

    count: int = 0
    mean_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Distribution:
        ordered = sorted(seconds)
        if not ordered:
            return cls()
        ms = [v * 1e3 for v in (percentile(ordered, 50), percentile(ordered, 90), percentile(ordered, 99))]
        return cls(len(ordered), sum(ordered) / len(ordered) * 1e3, *ms, ordered[-1] * 1e3)


def slo_attainment(latencies_s: Iterable[float], slo_s: float, frames_scheduled: int) -> float:
    """Share of scheduled frames decided within `slo_s` of being sent (0 when nothing was scheduled)."""
    if frames_scheduled <= 0:
        return 0.0
    within = sum(1 for v in latencies_s if v <= slo_s)
    return min(1.0, within / frames_scheduled)


def meets_target(attainment: float, target: float) -> bool:
    return attainment >= target - 1e-12  # 99/100 against 0.99 must pass despite float rounding


def capacity(levels: Sequence[tuple[int, float]], target: float) -> int | None:
    """The largest session count whose SLO attainment meets `target`; None when none does."""
    return max((n for n, attainment in levels if meets_target(attainment, target)), default=None)


def capacity_notes(levels: Sequence[tuple[int, float]], target: float) -> list[str]:
    """Caveats an SRE needs next to the capacity figure."""
    if not levels:
        return []
    notes = []
    best = capacity(levels, target)
    ordered = sorted(levels)
    if best is None:
        notes.append(f"no level met the SLO target ({target:.2%}); capacity is below {ordered[0][0]} sessions")
    else:
        failed_below = [n for n, a in ordered if n < best and not meets_target(a, target)]
        if failed_below:
            notes.append(f"levels {', '.join(map(str, failed_below))} missed the target although {best} met it: "
                         "the results are noisy; re-run with a longer --duration")
        if best == ordered[-1][0]:
            notes.append(f"the largest level tested ({best}) met the target: capacity is at least {best}; "
                         "sweep higher to find the limit")
    return notes


class LiveHistogram:
    """Latency histogram with ~2% wide logarithmic buckets: percentiles in O(buckets) once a second for
    the progress line, however many samples a long run collects. The exact figures come from the raw
    samples at the end."""

    _BASE = 1.02
    _FLOOR_S = 1e-5

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0

    def add(self, seconds: float) -> None:
        self.counts[max(0, int(math.log(max(seconds, self._FLOOR_S) / self._FLOOR_S, self._BASE)))] += 1
        self.total += 1

    def percentile(self, q: float) -> float | None:
        """Upper edge of the bucket holding the nearest-rank q-th percentile (within 2% above it)."""
        if not self.total:
            return None
        rank, seen = max(1, math.ceil(q / 100 * self.total)), 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return self._FLOOR_S * self._BASE ** (bucket + 1)
        return None  # unreachable: the counts sum to total


@dataclass(slots=True)
class LiveStats:
    """Counters every session updates as it goes (one event loop: no locks); read by the progress line."""

    level_sessions: int = 0
    sessions_active: int = 0
    sessions_done: int = 0
    frames_sent: int = 0
    frames_decided: int = 0
    frames_dropped: int = 0
    errors: int = 0
    latency: LiveHistogram = field(default_factory=LiveHistogram)


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    t_s: float  # bucket start, seconds since the level started
    width_s: float
    decided: int
    p50_ms: float | None
    p99_ms: float | None
    sessions_active: int  # sessions streaming at the bucket's middle


@dataclass(slots=True)
class LevelReport:
    """Everything measured at one load level (one number of concurrent sessions)."""

    sessions: int
    wall_s: float
    frames_scheduled: int
    frames_sent: int
    frames_decided: int
    frames_dropped: int  # dropped_by_server + undecided
    frames_dropped_by_server: int  # FRAME_DROPPED warnings (the server shed them to stay real-time)
    frames_undecided: int  # sent, never decided and never reported dropped
    decided_per_s: float
    latency_ms: Distribution  # frame sent -> its decision received
    lag_ms: Distribution  # decision received - the frame's wall-clock due time (behind the live edge)
    server_lag_ms: Distribution  # the server's own receive -> decide (Decision.lag_s)
    open_ms: Distribution  # Open sent -> SessionOpened received
    ttft_ms: Distribution  # trigger (fired decision received, or query sent) -> first response delta
    ttft_proactive_ms: Distribution
    ttft_query_ms: Distribution
    tpot_ms: Distribution  # (last delta - first delta) / (tokens - 1), per response
    server_ttft_ms: Distribution  # the server's trigger -> first token (ResponseDone.ttft_s)
    send_slip_ms: Distribution  # how late the client sent frames: the load generator's own health
    queries_sent: int
    responses: int
    response_tokens: int
    sessions_sustained: int  # streamed to the end and closed with status OK
    errors: dict[str, int]  # final gRPC status name -> sessions
    error_messages: list[str]  # distinct status details, first few
    warnings: dict[str, int]  # server Warning code -> count
    slo_ms: float
    slo_attainment: float
    slo_met: bool
    timeline: list[TimelinePoint]
    # With mixed models (--model repeated): per model, its sessions' figures ("" is the default model).
    by_model: dict[str, dict] = field(default_factory=dict)
    resumes: int = 0  # streams that went on after their connection broke (resumed, or in a new session)
    resume_ms: Distribution = field(default_factory=Distribution)  # the break -> SessionOpened
    inputs_resent: int = 0  # frames, queries and Closes written again after those breaks


def timeline(records: Sequence[SessionRecord], wall_s: float) -> list[TimelinePoint]:
    """Latency percentiles per time bucket, by decision arrival, with the sessions streaming then."""
    width = max(1.0, math.ceil(wall_s / TIMELINE_MAX_POINTS))
    buckets: dict[int, list[float]] = {}
    for r in records:
        for at, latency in zip(r.decided_at, r.latency_s):
            buckets.setdefault(int(at // width), []).append(latency)
    points = []
    for b in range(int(wall_s // width) + 1):
        values = sorted(buckets.get(b, ()))
        middle = (b + 0.5) * width
        active = sum(1 for r in records if r.started_s is not None and r.started_s <= middle
                     and (r.ended_s is None or middle < r.ended_s))
        points.append(TimelinePoint(b * width, width, len(values),
                                    percentile(values, 50) * 1e3 if values else None,
                                    percentile(values, 99) * 1e3 if values else None, active))
    return points


def aggregate(records: Sequence[SessionRecord], *, sessions: int, wall_s: float, slo_ms: float,
              slo_target: float) -> LevelReport:
    latencies = [v for r in records for v in r.latency_s]
    scheduled = sum(r.frames_scheduled for r in records)
    attainment = slo_attainment(latencies, slo_ms / 1e3, scheduled)
    by_server = sum(len(r.dropped) for r in records)
    undecided = sum(r.undecided for r in records)
    errors = Counter(r.status for r in records if r.status != "OK")
    messages = list(dict.fromkeys(f"{r.status}: {r.detail}" for r in records if r.status != "OK"))[:5]
    warnings: Counter[str] = Counter()
    for r in records:
        warnings.update(r.warnings)
    ttft = [(trigger, v) for r in records for trigger, v in r.ttft]
    return LevelReport(
        sessions=sessions, wall_s=wall_s, frames_scheduled=scheduled,
        frames_sent=sum(r.frames_sent for r in records), frames_decided=len(latencies),
        frames_dropped=by_server + undecided, frames_dropped_by_server=by_server, frames_undecided=undecided,
        decided_per_s=len(latencies) / wall_s if wall_s > 0 else 0.0,
        latency_ms=Distribution.of(latencies),
        lag_ms=Distribution.of(v for r in records for v in r.lag_s),
        server_lag_ms=Distribution.of(v for r in records for v in r.server_lag_s),
        open_ms=Distribution.of(r.open_s for r in records if r.open_s is not None),
        ttft_ms=Distribution.of(v for _, v in ttft),
        ttft_proactive_ms=Distribution.of(v for trigger, v in ttft if trigger == "proactive"),
        ttft_query_ms=Distribution.of(v for trigger, v in ttft if trigger == "query"),
        tpot_ms=Distribution.of(v for r in records for v in r.tpot_s),
        server_ttft_ms=Distribution.of(v for r in records for v in r.server_ttft_s),
        send_slip_ms=Distribution.of(v for r in records for v in r.send_slip_s),
        queries_sent=sum(r.queries_sent for r in records), responses=sum(r.responses for r in records),
        response_tokens=sum(r.response_tokens for r in records),
        sessions_sustained=sum(r.sustained for r in records),
        errors=dict(sorted(errors.items())), error_messages=messages, warnings=dict(sorted(warnings.items())),
        slo_ms=slo_ms, slo_attainment=attainment, slo_met=meets_target(attainment, slo_target),
        timeline=timeline(records, wall_s), by_model=per_model(records, slo_ms),
        resumes=sum(len(r.resume_s) for r in records),
        resume_ms=Distribution.of(v for r in records for v in r.resume_s),
        inputs_resent=sum(r.inputs_resent for r in records))


def per_model(records: Sequence[SessionRecord], slo_ms: float) -> dict[str, dict]:
    """Per model, when the sessions ran more than one: sessions, frames decided, latency and SLO, errors."""
    models = sorted({r.model for r in records})
    if len(models) < 2:
        return {}
    out = {}
    for model in models:
        mine = [r for r in records if r.model == model]
        latencies = [v for r in mine for v in r.latency_s]
        latency = Distribution.of(latencies)
        out[model or "(default)"] = {
            "sessions": len(mine), "sessions_sustained": sum(r.sustained for r in mine),
            "frames_decided": len(latencies), "latency_p50_ms": latency.p50_ms, "latency_p99_ms": latency.p99_ms,
            "slo_attainment": slo_attainment(latencies, slo_ms / 1e3, sum(r.frames_scheduled for r in mine)),
            "errors": dict(sorted(Counter(r.status for r in mine if r.status != "OK").items()))}
    return out


@dataclass(slots=True)
class RunReport:
    """A whole run: the settings, one LevelReport per level, and (for a sweep) the capacity."""

    target: str
    started_at: str  # ISO 8601, UTC
    config: dict
    frames: str  # what was streamed
    slo_ms: float
    slo_target: float
    levels: list[LevelReport]
    sweep: bool  # levels were a sweep: `capacity` is meaningful
    capacity: int | None  # largest session count meeting the SLO target (sweeps only)
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
