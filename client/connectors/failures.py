"""``Failures``: how a connector reports what an engine would swallow.

Engines turn a storage backend's failure into a miss (and recompute), so a
connector must never raise into them, yet a broken deployment must not stay
silent. Each failure is counted, by kind ("lookup", "get", "put" ...); the
first of each kind is logged at ERROR, later ones at most once a minute.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

REPORT_INTERVAL = 60.0


class Failures:
    def __init__(self, log: logging.Logger, who: str, interval: float = REPORT_INTERVAL) -> None:
        self.log = log
        self.who = who
        self.interval = interval
        self.by_kind: Counter[str] = Counter()
        self._reported: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())

    def __call__(self, kind: str, exc: BaseException, consequence: str = "the engine sees a miss") -> None:
        now = time.monotonic()
        with self._lock:
            self.by_kind[kind] += 1
            last = self._reported.get(kind)
            report = last is None or now - last >= self.interval
            if report:
                self._reported[kind] = now
        if report:
            self.log.error("%s: %s failed (%s): %s: %s", self.who, kind, consequence, type(exc).__name__, exc)
