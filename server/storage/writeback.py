"""Write-back of "memory" puts to disk: in the background, deferred while puts stream in.

A "memory" put is acknowledged once its blocks are in the arena; writing them to
disk copies every byte again (into the page cache) and, on a small host, takes
the CPU and memory bandwidth that the puts themselves need. So dirty blocks
wait in a queue until one of these, whichever comes first:

- puts pause: none has arrived for ``idle`` seconds (the end of a burst);
- the oldest queued block has waited ``delay`` seconds (what a crash can lose
  is bounded in time, as the kernel bounds dirty pages with dirty_expire);
- queued bytes reach ``high_water`` (room in the arena is never left to chance);
- someone needs it now: a put waiting for arena room (dirty blocks cannot be
  evicted), a flush, shutdown.

Blocks are written in batches of at most ``batch_bytes`` on one thread at the
lowest CPU priority, each batch pinned while its bytes are copied out and then
marked clean (evictable). A block deleted or overwritten while queued is never
written. ``delay`` 0 writes each put back at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from kvstore.server.storage.disk import DiskTier
from kvstore.server.storage.memory import MemoryTier, Resident

log = logging.getLogger("kvstore.server.writeback")

IDLE_SECONDS = 0.05
BATCH_BYTES = 64 << 20


def _lowest_cpu_priority() -> None:
    """Nice the calling thread to 19 (Linux sets priorities per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass  # elsewhere: normal priority


class WriteBack:
    def __init__(
        self,
        memory: MemoryTier,
        disk: DiskTier,
        *,
        delay: float,
        high_water: int,
        on_clean: Callable[[], None],
        idle: float = IDLE_SECONDS,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        self.memory = memory
        self.disk = disk
        self.delay = max(0.0, delay)
        self.idle = min(idle, self.delay)
        self.high_water = max(1, high_water)
        self.batch_bytes = max(1, batch_bytes)
        self._on_clean = on_clean
        # Its own thread: on the request pool, "memory" puts would queue behind
        # write-backs and be acknowledged at disk speed.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-writeback", initializer=_lowest_cpu_priority)
        self._queue: deque[tuple[float, Resident]] = deque()  # (when queued, block), oldest first
        self.queued_bytes = 0
        self._last_added = 0.0
        self._hurry = False  # write everything queued without waiting
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._writing = False
        self._idle_waiters: list[asyncio.Future] = []
        self.batches = 0  # written so far (for tests and stats)

    # -- on the event loop ----------------------------------------------------

    def add(self, entries: list[Resident]) -> None:
        """Queue a put's dirty blocks."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for entry in entries:
            self._queue.append((now, entry))
            self.queued_bytes += entry.length
        self._last_added = now
        self._start(loop)
        self._wake.set()  # with delay 0 the queue is due at once (_due_in)

    def hurry(self) -> None:
        """Write everything queued now (a put is waiting for arena room, or a flush)."""
        if self._queue and self._wake is not None:
            self._hurry = True
            self._wake.set()

    async def drain(self) -> None:
        """Write everything queued now and wait until it is on disk (not fsynced)."""
        if not self._queue and not self._writing:
            return
        self.hurry()
        waiter = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        await waiter

    async def close(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._pool.shutdown(wait=True)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="kvstore-writeback")

    def _due_in(self, now: float) -> float:
        """Seconds until the queue must be written (0: now)."""
        if self._hurry or self.queued_bytes >= self.high_water:
            return 0.0
        oldest = self._queue[0][0]
        return max(0.0, min(self._last_added + self.idle, oldest + self.delay) - now)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._hurry = False
                for waiter in self._idle_waiters:
                    if not waiter.done():
                        waiter.set_result(None)
                self._idle_waiters.clear()
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._due_in(loop.time())
            if wait > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._write(self._take())

    def _take(self) -> list[Resident]:
        """The next batch: the oldest queued blocks still current, up to batch_bytes."""
        batch: list[Resident] = []
        size = 0
        while self._queue and (not batch or size + self._queue[0][1].length <= self.batch_bytes):
            _, entry = self._queue.popleft()
            self.queued_bytes -= entry.length
            if entry.retired or not entry.dirty:
                continue  # deleted or overwritten while queued: nothing to keep
            batch.append(entry)
            size += entry.length
        return batch

    async def _write(self, entries: list[Resident]) -> None:
        if not entries:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        for entry in entries:
            entry.writeback = done  # a delete waits for it, so the write cannot resurrect the key
            self.memory.pin(entry)
        self._writing = True
        try:
            views = [self.memory.arena.view(entry.offset, entry.length) for entry in entries]

            def write_back() -> None:
                items = [
                    (entry.key, view, entry.length, entry.checksum, entry.seq)
                    for entry, view in zip(entries, views)
                    if not entry.retired  # deleted or overwritten since it was taken
                ]
                if items:
                    self.disk.write(items, sync=False)

            await loop.run_in_executor(self._pool, write_back)
            for entry in entries:
                self.memory.mark_clean(entry)
            self.batches += 1
        except Exception:
            log.exception("write-back of memory-durability blocks failed; they stay dirty in memory")
        finally:
            self._writing = False
            for entry in entries:
                self.memory.unpin(entry)
            done.set_result(None)
            self._on_clean()
