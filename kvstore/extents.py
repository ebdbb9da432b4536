"""Best-fit allocation of aligned extents within one buffer, with coalescing.

Used for the daemon's memory-tier arena and the SDK's registered staging pool.
Blocks of one model are mostly of one size, so best-fit with coalescing keeps
fragmentation low without the 2x rounding a power-of-two slab would cost on
KV-cache blocks (e.g. a 40 MiB LMCache chunk).
"""

from __future__ import annotations

import bisect

ALIGNMENT = 64  # one cache line; RDMA needs no more


def _round_up(n: int) -> int:
    return (max(n, 1) + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


class ExtentAllocator:
    """Best-fit allocation of aligned extents in [0, capacity), with coalescing on free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity & ~(ALIGNMENT - 1)
        self._by_start: dict[int, int] = {}
        self._by_end: dict[int, int] = {}
        self._sizes: list[tuple[int, int]] = []  # sorted (size, start)
        self.used = 0
        if self.capacity:
            self._add(0, self.capacity)

    @staticmethod
    def rounded(n: int) -> int:
        return _round_up(n)

    def allocate(self, nbytes: int) -> int | None:
        """Start offset of a free extent of ``rounded(nbytes)`` bytes, or None."""
        size = _round_up(nbytes)
        i = bisect.bisect_left(self._sizes, (size, -1))
        if i == len(self._sizes):
            return None
        free_size, start = self._sizes[i]
        self._remove(start, free_size)
        if free_size > size:
            self._add(start + size, free_size - size)
        self.used += size
        return start

    def free(self, start: int, nbytes: int) -> None:
        size = _round_up(nbytes)
        self.used -= size
        end = start + size
        prev_start = self._by_end.get(start)
        if prev_start is not None:
            self._remove(prev_start, start - prev_start)
            start = prev_start
        next_size = self._by_start.get(end)
        if next_size is not None:
            self._remove(end, next_size)
            end += next_size
        self._add(start, end - start)

    @property
    def largest_free(self) -> int:
        return self._sizes[-1][0] if self._sizes else 0

    @property
    def free_extents(self) -> int:
        return len(self._sizes)

    def _add(self, start: int, size: int) -> None:
        self._by_start[start] = size
        self._by_end[start + size] = start
        bisect.insort(self._sizes, (size, start))

    def _remove(self, start: int, size: int) -> None:
        del self._by_start[start]
        del self._by_end[start + size]
        i = bisect.bisect_left(self._sizes, (size, start))
        del self._sizes[i]
