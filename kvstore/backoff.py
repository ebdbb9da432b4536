"""Capped exponential backoff with jitter: the delays between retries, for the
SDK's retry policy and the daemon's etcd reconnects alike."""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvstore.errors import ConfigError


@dataclass(frozen=True)
class Backoff:
    """``initial`` seconds before the first retry, times ``multiplier`` for each
    one after, at most ``cap``; each delay spread by ±``jitter`` (a fraction),
    so that clients failing together do not retry together."""

    initial: float = 0.1
    multiplier: float = 2.0
    cap: float = 2.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.initial < 0 or self.cap < 0 or self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ConfigError("backoff: delays must be non-negative, multiplier at least 1 and jitter in [0, 1)")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first)."""
        raw = min(self.cap, self.initial * self.multiplier ** min(retry, 64))
        return raw * random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else raw
