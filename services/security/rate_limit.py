"""Per-stream rate limits: the frames a client stream (or a tenant) may send each second."""

from __future__ import annotations

import time


class IngressLimit:
    """A token bucket: a stream may send `rate` frames a second, with a burst of `burst` frames."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
