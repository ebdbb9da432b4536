"""Writes: put values or a registered region's blocks on their replicas, and delete.

A batch is split into RPCs of bounded keys and bytes; each chunk goes to its
keys' replicas through the write engine (``replicas.write``). On the zero-copy
path the daemon reads the blocks from the client's memory (plain puts first
copy their values into the SDK's registered staging pool, once for every
replica); a daemon without the data plane, or one that cannot stage a block,
gets the bytes inline (``fallback``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Sequence

from kvstore import errors
from kvstore._proto.v1 import data_pb2
from kvstore.checksum import checksum
from kvstore.client import replicas
from kvstore.client.batching import bounded, by_count, by_count_and_bytes
from kvstore.client.config import ClientConfig
from kvstore.client.fallback import Fallback, fallback_of
from kvstore.client.mapcache import MapCache
from kvstore.client.nodes import Nodes
from kvstore.client.regions import MemoryRegion
from kvstore.durability import Durability
from kvstore.extents import ExtentAllocator
from kvstore.protocol.convert import durability_to_proto

log = logging.getLogger("kvstore.client")

# Copies into the staging pool above this size run off the event loop.
THREAD_COPY_BYTES = 4 << 20


@dataclass(frozen=True)
class StagedBlocks:
    """Blocks that lie in a registered region, ready for the daemon to read:
    their offsets, sizes and checksums (None where the daemon computes it)."""

    region: MemoryRegion
    offsets: Sequence[int]
    sizes: Sequence[int]
    checksums: Sequence[int | None]

    def view(self, position: int) -> memoryview:
        return self.region.view(self.offsets[position], self.sizes[position])


class Writes:
    def __init__(self, config: ClientConfig, namespace: data_pb2.Namespace, maps: MapCache, nodes: Nodes) -> None:
        self.config = config
        self.namespace = namespace
        self.maps = maps
        self.nodes = nodes

    async def put_values(self, keys: list[bytes], views: list[memoryview], level: Durability, call: replicas.Call) -> int:
        """Store validated values; returns how many were stored."""
        sizes = [v.nbytes for v in views]
        ranges = by_count_and_bytes(sizes, self.config.max_batch_keys, self.nodes.max_batch_bytes)
        chunks = (self._put_staged(keys[a:b], views[a:b], level, call, a) for a, b in ranges)
        return sum(await bounded(chunks, self.config.concurrency))

    async def put_region(
        self, keys: list[bytes], region: MemoryRegion, offsets: Sequence[int], sizes: Sequence[int], level: Durability, call: replicas.Call
    ) -> int:
        """Store validated blocks that lie in ``region``; every replica reads them by RMA."""
        zero_copy = self.nodes.zero_copy and region.zero_copy
        # A co-located daemon that copies this process's memory hashes the blocks
        # itself; the others get them from _put_from_region.
        checksums = region.checksums(offsets, sizes, daemon=self.nodes.copies_process_anywhere()) if zero_copy else None
        ranges = by_count_and_bytes(list(sizes), self.config.max_batch_keys, self.nodes.max_batch_bytes)

        async def chunk(a: int, b: int) -> int:
            staged = StagedBlocks(region, offsets[a:b], sizes[a:b], checksums[a:b] if zero_copy else [None] * (b - a))
            return await self._put_chunk(keys[a:b], None, staged, zero_copy, level, call, a)

        return sum(await bounded((chunk(a, b) for a, b in ranges), self.config.concurrency))

    async def _put_staged(self, keys, views, level: Durability, call: replicas.Call, start: int) -> int:
        """Copy values into the registered staging pool once; every replica reads them from there."""
        staging = self.nodes.staging
        sizes = [v.nbytes for v in views]
        total = sum(ExtentAllocator.rounded(n) for n in sizes)
        base = await staging.acquire(total) if self.nodes.zero_copy and staging else None
        if base is None:  # inline, or larger than the whole pool
            return await self._put_chunk(keys, views, None, False, level, call, start)
        try:
            offsets = []
            cursor = base
            for n in sizes:
                offsets.append(cursor)
                cursor += ExtentAllocator.rounded(n)
            region = staging.region

            def fill() -> None:
                for offset, view in zip(offsets, views):
                    region.view(offset, view.nbytes)[:] = view

            if total >= THREAD_COPY_BYTES:
                await asyncio.to_thread(fill)
            else:
                fill()
            staged = StagedBlocks(region, offsets, sizes, region.checksums(offsets, sizes))
            return await self._put_chunk(keys, views, staged, True, level, call, start)
        finally:
            await staging.release(base, total)

    async def _put_chunk(
        self, keys, views, staged: StagedBlocks | None, zero_copy: bool, level: Durability, call: replicas.Call, start: int
    ) -> int:
        """Write one chunk to its replicas: by the data plane from ``staged`` where
        the daemon has it, inline (from ``views``, else from ``staged``) otherwise."""

        async def send(node: str, positions: list[int], timeout: float) -> list[bool]:
            sub = [keys[p] for p in positions]
            if zero_copy and self.nodes.zero_copy_to(self.maps.view.addresses[node]):
                part = StagedBlocks(
                    staged.region,
                    [staged.offsets[p] for p in positions],
                    [staged.sizes[p] for p in positions],
                    [staged.checksums[p] for p in positions],
                )
                if await self._put_from_region(node, sub, part, level, timeout):
                    return [True] * len(positions)
            values = [views[p] for p in positions] if views is not None else [staged.view(p) for p in positions]
            await self.put_inline(node, sub, values, level, timeout)
            return [True] * len(positions)

        await replicas.write(keys, self.maps, send, call, start)
        return len(keys)

    async def put_inline(self, node: str, keys, views, level: Durability, timeout: float) -> None:
        blocks = []
        for key, view in zip(keys, views):
            data = view.tobytes() if not isinstance(view.obj, bytes) or view.nbytes != len(view.obj) else view.obj
            blocks.append(data_pb2.BlockWrite(key=key, value=data, length=len(data), checksum=checksum(data)))
        request = data_pb2.PutRequest(namespace=self.namespace, blocks=blocks, durability=durability_to_proto(level))
        await self.maps.call(node, "data", "Put", request, timeout)

    async def _put_from_region(self, node: str, keys, staged: StagedBlocks, level: Durability, timeout: float) -> bool:
        """A zero-copy Put; False when the daemon cannot stage the blocks (send them inline)."""
        region = staged.region
        address = self.maps.view.addresses[node]
        checksums = staged.checksums
        # Shared memory, or this process's memory that the daemon copies itself: it
        # hashes as it copies (checksums already computed, as for staged values, still go).
        if region.shared is not None:
            omitted = region.daemon_checksums
        else:
            omitted = None in checksums and self.nodes.copies_process(address)
        if not omitted:
            checksums = [region.checksum(o, n) if c is None else c for o, n, c in zip(staged.offsets, staged.sizes, checksums)]
        wire = region.wire()
        if region.shared is not None:
            wire.shared_memory.checksums_omitted = omitted
        else:
            wire.checksums_omitted = omitted
        request = data_pb2.PutRequest(
            namespace=self.namespace,
            durability=durability_to_proto(level),
            region=wire,
            blocks=[
                data_pb2.BlockWrite(key=k, length=n, checksum=0 if omitted else c, remote_address=region.address + o)
                for k, o, n, c in zip(keys, staged.offsets, staged.sizes, checksums)
            ],
        )
        try:
            await self.maps.call(node, "data", "Put", request, timeout)
        except errors.KVStoreError as exc:
            fallback = fallback_of(exc)
            if fallback is Fallback.INLINE:
                return False
            if fallback is not Fallback.WITH_CHECKSUMS or not omitted:
                raise
            # That daemon reads it by RMA: it needs our checksums.
            if region.shared is not None:
                region.daemon_checksums = False
            else:
                self.nodes.process_copy_refused.add(address)
            return await self._put_from_region(node, keys, staged, level, timeout)
        return True

    async def delete(self, keys: list[bytes]) -> int:
        """Delete from every node that holds them; how many existed. Raises
        UnavailableError when an owner of a key could not be reached (its copy
        would come back when it does)."""
        existed: set[bytes] = set()
        for _, chunk in by_count(keys, self.config.max_batch_keys):
            request = data_pb2.KeysRequest(namespace=self.namespace, keys=chunk)
            timeout = self.maps.new_call().attempt_timeout()
            owners = {node for key in chunk for node in self.maps.owners(key)}
            outcomes = await self.maps.every_node(lambda node: self.maps.call(node, "data", "Delete", request, timeout))
            for node, result in outcomes:
                if isinstance(result, errors.KVStoreError):
                    if not result.retryable or node in owners:
                        raise result
                    continue
                existed.update(k for k, e in zip(chunk, result.existed) if e)
        return len(existed)
