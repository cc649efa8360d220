"""What one load test does: a typed, validated description of the load, the target and the SLO.

Every limit is checked here, before anything connects, so a mistyped flag fails in a second with a
message naming the flag instead of minutes into a run. The hard caps keep a load test from turning into
an accidental denial of service (of the target, or of the machine generating the load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_ADDRESS = "127.0.0.1:50051"

# Hard caps. One client process past these numbers measures its own event loop more than the server.
MAX_SESSIONS = 1000
MAX_DURATION_S = 3600.0
MAX_RAMP_UP_S = 600.0
MAX_FPS = 60.0
MAX_QUERIES_PER_MIN = 600.0
MAX_SWEEP_LEVELS = 16
IMAGE_FORMATS = ("jpeg", "png")
CACHE_POLICIES = ("", "full", "sink_window")  # "": the server's default


class ConfigError(ValueError):
    """A load-test setting is out of range; the message names the flag and the allowed values."""


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One load test. Each session streams for `duration_s` from its own start; session k of N starts
    k * ramp_up_s / N after the first, so full concurrency holds from the end of the ramp to the first
    session's end. A sweep (`sweep` levels, or doubling up to `sweep_max`) runs one level after another."""

    address: str = DEFAULT_ADDRESS
    sessions: int = 4
    duration_s: float = 30.0
    fps: float = 2.0
    ramp_up_s: float = 0.0
    queries_per_min: float = 0.0  # Poisson rate per session
    seed: int = 0
    video: str | None = None  # None: synthetic frames
    frame_size: int = 384  # pixels per side of the frames sent
    image_format: str = "jpeg"
    threshold: float | None = None  # None: the server's default
    max_new_tokens: int = 0  # 0: the server's default
    cache_policy: str = ""
    models: tuple[str, ...] = ()  # served models (Open.model), taken in turn by the sessions; (): the default
    credentials: tuple[tuple[str, str], ...] = ()
    tls: bool = False  # TLS with the system's roots; also implied by any of the files below
    tls_ca: str = ""  # PEM CA the server's certificate must chain to
    tls_cert: str = ""  # PEM client certificate and key, for servers that require them (mutual TLS)
    tls_key: str = ""
    slo_ms: float = 250.0
    slo_target: float = 0.99
    sweep: tuple[int, ...] = ()
    sweep_max: int | None = None
    connect_timeout_s: float = 5.0
    open_timeout_s: float = 30.0  # Open -> SessionOpened (admission may queue behind a running step)
    drain_timeout_s: float = 30.0  # Close -> the last decision
    streams_per_connection: int = 32
    resume_attempts: int = 8  # reconnections in a row a session whose connection broke may try (0: none)
    levels: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        _check_address(self.address)
        _check_count("--sessions", self.sessions, MAX_SESSIONS)
        _check_range("--duration", self.duration_s, 0.0, MAX_DURATION_S, low_open=True, unit="s", cap=True)
        _check_range("--fps", self.fps, 0.0, MAX_FPS, low_open=True, cap=True)
        _check_range("--ramp-up", self.ramp_up_s, 0.0, MAX_RAMP_UP_S, unit="s", cap=True)
        _check_range("--queries-per-min", self.queries_per_min, 0.0, MAX_QUERIES_PER_MIN, cap=True)
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        # Even and >= 64: the synthetic clip renderer's constraints; 2048 keeps frames under gRPC's 4 MiB default.
        if not (isinstance(self.frame_size, int) and 64 <= self.frame_size <= 2048 and self.frame_size % 2 == 0):
            raise ConfigError(f"--frame-size must be an even number of pixels in [64, 2048], got {self.frame_size!r}")
        if self.threshold is not None:
            _check_range("--threshold", self.threshold, 0.0, 1.0)
        if not 0 <= self.max_new_tokens <= 4096:
            raise ConfigError(f"--max-new-tokens must be in [0, 4096] (0: the server's default), "
                              f"got {self.max_new_tokens}")
        if self.cache_policy not in CACHE_POLICIES:
            raise ConfigError(f"--cache must be full or sink_window, got {self.cache_policy!r}")
        for model in self.models:
            if not model or len(model) > 63:
                raise ConfigError(f"--model takes a served model's name (`liveserve models`), got {model!r}")
        for key, _ in self.credentials:
            if not key:
                raise ConfigError("--credential needs KEY=VALUE with a non-empty KEY")
        if self.uses_tls:
            from liveserve.services.security.tls import TlsConfigError, channel_credentials

            try:  # read now: a bad file is a bad option, not a failed run
                channel_credentials(self.tls_ca, self.tls_cert, self.tls_key)
            except TlsConfigError as exc:
                raise ConfigError(f"--ca/--cert/--key: {exc}") from None
        _check_range("--slo-ms", self.slo_ms, 0.0, 3_600_000.0, low_open=True, unit="ms")
        _check_range("--slo-target", self.slo_target, 0.0, 1.0, low_open=True)
        _check_range("--connect-timeout", self.connect_timeout_s, 0.0, 600.0, low_open=True, unit="s")
        _check_range("--open-timeout", self.open_timeout_s, 0.0, 600.0, low_open=True, unit="s")
        _check_range("--drain-timeout", self.drain_timeout_s, 0.0, 3600.0, low_open=True, unit="s")
        _check_count("--streams-per-connection", self.streams_per_connection, 1000)
        if not isinstance(self.resume_attempts, int) or not 0 <= self.resume_attempts <= 100:
            raise ConfigError(f"--resume-attempts must be a whole number from 0 to 100, got {self.resume_attempts!r}")
        object.__setattr__(self, "levels", self._levels())

    def _levels(self) -> tuple[int, ...]:
        if self.sweep and self.sweep_max is not None:
            raise ConfigError("give either --sweep or --sweep-max, not both")
        if self.sweep:
            for n in self.sweep:
                _check_count("--sweep level", n, MAX_SESSIONS)
            levels = tuple(sorted(set(self.sweep)))
        elif self.sweep_max is not None:
            _check_count("--sweep-max", self.sweep_max, MAX_SESSIONS)
            levels = doubling_levels(self.sweep_max)
        else:
            return (self.sessions,)
        if len(levels) > MAX_SWEEP_LEVELS:
            raise ConfigError(f"--sweep has {len(levels)} levels; the cap is {MAX_SWEEP_LEVELS}")
        return levels

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_key)

    @property
    def is_sweep(self) -> bool:
        return bool(self.sweep) or self.sweep_max is not None

    @property
    def frames_per_session(self) -> int:
        """Frames each session is scheduled to send: stream times k / fps < duration_s."""
        return math.ceil(self.duration_s * self.fps - 1e-9)

    def planned_seconds(self) -> float:
        """Streaming time of the whole run, drains excluded (what the caps bound)."""
        return len(self.levels) * (self.ramp_up_s + self.duration_s)


def doubling_levels(top: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to `top`, ending with `top` itself when it is not a power of two."""
    levels, n = [], 1
    while n < top:
        levels.append(n)
        n *= 2
    return tuple(levels + [top])


def parse_levels(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8); ConfigError naming the bad item otherwise."""
    levels = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            levels.append(int(item))
        except ValueError:
            raise ConfigError(f"--sweep takes comma-separated session counts like 1,2,4,8; {item!r} is not "
                              "one") from None
    if not levels:
        raise ConfigError("--sweep needs at least one session count, e.g. 1,2,4,8")
    return tuple(levels)


def _check_address(address: str) -> None:
    if address.startswith(("unix:", "unix-abstract:")):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address must be HOST:PORT (e.g. {DEFAULT_ADDRESS}), got {address!r}")


def _check_count(flag: str, value: int, cap: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{flag} must be a whole number >= 1, got {value!r}")
    if value > cap:
        raise ConfigError(f"{flag} is {value}; the hard cap is {cap}")


def _check_range(flag: str, value: float, low: float, high: float, *, low_open: bool = False, unit: str = "",
                 cap: bool = False) -> None:
    """low <= value <= high (low < value when low_open); `cap`: high is a hard cap, and the message says so."""
    unit = f" {unit}" if unit else ""
    if cap and value > high:
        raise ConfigError(f"{flag} is {value:g}{unit}; the hard cap is {high:g}{unit}")
    if not ((value > low if low_open else value >= low) and value <= high):  # NaN fails both
        bound = ">" if low_open else ">="
        raise ConfigError(f"{flag} must be {bound} {low:g} and <= {high:g}{unit}, got {value!r}")
