"""Read repair: a block one replica had is written back, in the background, to
the owners that answered "not here" for it (a replica that lost it, or dropped
it as corrupt)."""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from kvstore import errors
from kvstore.client.mapcache import MapCache
from kvstore.client.writes import Writes
from kvstore.durability import Durability

log = logging.getLogger("kvstore.client")


class Repair:
    def __init__(self, maps: MapCache, writes: Writes, durability: Durability, timeout: float) -> None:
        self.maps = maps
        self.writes = writes
        self.durability = durability
        self.timeout = timeout
        self.repaired = 0  # replicas rewritten
        self._tasks: set[asyncio.Task] = set()

    def schedule(self, keys: Sequence[bytes], values: Sequence, missed_on: list[list[str]]) -> None:
        """Rewrite each found value on the owners among the nodes that missed it."""
        by_node: dict[str, list[int]] = {}
        for i, (value, missed) in enumerate(zip(values, missed_on)):
            if value is None or not missed:
                continue
            owners = self.maps.owners(keys[i])
            for node in missed:
                if node in owners:
                    by_node.setdefault(node, []).append(i)
        for node, positions in by_node.items():
            batch_keys = [keys[i] for i in positions]
            batch_values = [memoryview(values[i]) for i in positions]
            task = asyncio.create_task(self._rewrite(node, batch_keys, batch_values))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _rewrite(self, node: str, keys: list[bytes], values: list[memoryview]) -> None:
        try:
            await self.writes.put_inline(node, keys, values, self.durability, self.timeout)
        except errors.KVStoreError as exc:
            log.debug("read repair of %d blocks on %s failed: %s", len(keys), node, exc)
            return
        self.repaired += len(keys)
        log.info("read repair: %d blocks rewritten on %s", len(keys), node)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
