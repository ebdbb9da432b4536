"""One measured case and the arithmetic on it (GB/s, ops/s, latency percentiles)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GB = 1e9  # throughput is in decimal GB/s, as link and disk speeds are quoted


class BenchError(RuntimeError):
    """The benchmark cannot produce a trustworthy number (wrong data, daemon failure)."""


@dataclass
class Result:
    """``blocks`` blocks of ``block_size`` bytes moved in ``seconds``.

    ``latencies`` holds one duration per call (each call moves a batch), over
    every client process of the case. ``system``, ``op`` and ``concurrency``
    (client processes) place the result in the comparison tables.
    """

    case: str
    block_size: int
    blocks: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    system: str = ""
    op: str = ""
    concurrency: int = 1

    @property
    def nbytes(self) -> int:
        return self.blocks * self.block_size

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / GB if self.seconds > 0 else math.inf

    @property
    def ops_per_s(self) -> float:
        return self.blocks / self.seconds if self.seconds > 0 else math.inf

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def p50_ms(self) -> float | None:
        return percentile(self.latencies, 50) * 1e3 if self.latencies else None

    @property
    def p99_ms(self) -> float | None:
        return percentile(self.latencies, 99) * 1e3 if self.latencies else None

    def to_dict(self) -> dict:
        return {
            "case": self.case,
            "system": self.system,
            "op": self.op,
            "concurrency": self.concurrency,
            "block_size": self.block_size,
            "blocks": self.blocks,
            "bytes": self.nbytes,
            "seconds": self.seconds,
            "gbps": self.gbps,
            "ops_per_s": self.ops_per_s,
            "calls": self.calls,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "latencies_ms": [round(s * 1e3, 4) for s in self.latencies],
        }


def best_runs(results: list[Result]) -> list[Result]:
    """The fastest run of each case (system, op, block size, clients), in the order the cases first ran.

    Interference from the rest of the machine only ever slows a run down, so the
    best of a few runs is the closest to what the system itself can do; every
    row of a report (limits, kvstore and peers alike) is taken this way."""
    best: dict[tuple, Result] = {}
    for r in results:
        key = (r.system, r.op, r.block_size, r.concurrency)
        if key not in best or r.seconds < best[key].seconds:
            best[key] = r
    return list(best.values())


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def blocks_for(volume: int, block_size: int, *, batch: int = 1, min_calls: int = 1) -> int:
    """How many blocks a case moves: about ``volume`` bytes, in whole batches,
    and at least ``min_calls`` batches so that latency percentiles have samples."""
    calls = max(min_calls, math.ceil(volume / (block_size * batch)))
    return calls * batch


def calls_per_client(volume: int, block_size: int, *, batch: int, min_calls: int, concurrency: int) -> int:
    """Calls each of ``concurrency`` clients makes so that together they move about
    ``volume`` bytes in at least ``min_calls`` calls (every client makes at least one)."""
    total = blocks_for(volume, block_size, batch=batch, min_calls=min_calls) // batch
    return max(1, math.ceil(total / concurrency))
