"""Splitting big batches into bounded RPCs, and running them a few at a time."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


def by_count(items: Sequence[T], max_items: int) -> Iterator[tuple[int, Sequence[T]]]:
    """(start index, chunk) pairs of at most ``max_items`` items."""
    for start in range(0, len(items), max_items):
        yield start, items[start : start + max_items]


def by_count_and_bytes(sizes: Sequence[int], max_items: int, max_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, stop) index ranges of at most ``max_items`` items and ``max_bytes`` bytes
    (a single item larger than ``max_bytes`` travels alone)."""
    start = 0
    total = 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_items or total + size > max_bytes):
            yield start, i
            start, total = i, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


async def bounded(calls: Iterable[Awaitable[T]], concurrency: int) -> list[T]:
    """Await ``calls`` with at most ``concurrency`` in flight; results in order.
    When one fails, the others are cancelled and awaited before it is raised."""
    calls = list(calls)
    if len(calls) == 1:
        return [await calls[0]]
    gate = asyncio.Semaphore(concurrency)

    async def gated(coro):
        async with gate:
            return await coro

    tasks = [asyncio.ensure_future(gated(c)) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
