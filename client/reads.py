"""Reads: get values or fill a registered region, exists, prefix lookups, listing.

A batch is split into bounded RPCs; each goes to its keys' replicas through
the read engine (``replicas.read``), which asks owners in ring order and
stands in the next nodes for failed ones. On the zero-copy path the daemon
writes the blocks into the client's memory (plain gets land in the SDK's
staging pool first); otherwise values come back inline. Every value is
verified against its writer's checksum (``TransitCheck``), and owners that
answered "not here" for a block another replica had are repaired.
"""

from __future__ import annotations

import logging
from typing import Sequence

from kvstore import errors
from kvstore._proto.v1 import data_pb2
from kvstore.checksum import checksum
from kvstore.client import replicas
from kvstore.client.batching import bounded, by_count
from kvstore.client.config import ClientConfig
from kvstore.client.fallback import Fallback, fallback_of
from kvstore.client.mapcache import MapCache, answers
from kvstore.client.nodes import Nodes
from kvstore.client.regions import MemoryRegion
from kvstore.client.repair import Repair
from kvstore.extents import ExtentAllocator

log = logging.getLogger("kvstore.client")

LIST_PAGE = 1000


class TransitCheck:
    """The one checksum-retry rule of reads: a block whose bytes fail their
    checksum in transit is asked for once more from the same daemon; failing
    again, it raises DataCorruptionError (and the read engine moves on to
    another replica)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._retried: set[int] = set()

    def failed(self, position: int) -> None:
        if position in self._retried:
            raise errors.DataCorruptionError(
                f"block {position} failed its checksum twice in transit from {self.node}", index=position
            )
        self._retried.add(position)
        log.warning("block %d failed its checksum in transit from %s; asking again", position, self.node)


class Reads:
    def __init__(
        self, config: ClientConfig, namespace: data_pb2.Namespace, maps: MapCache, nodes: Nodes, repair: Repair
    ) -> None:
        self.config = config
        self.namespace = namespace
        self.maps = maps
        self.nodes = nodes
        self.repair = repair
        self._slot_hint = 64 << 10  # staging slot per key for plain gets; follows observed sizes

    # -- routing -----------------------------------------------------------------

    async def _read(self, keys: Sequence[bytes], send: replicas.Send, call: replicas.Call, start: int) -> replicas.ReadResult:
        """Route a read; misses found while the map was changing are asked again under the new map."""
        epoch = self.maps.view.epoch
        failures_as_miss = self.config.read_failures == "miss"
        result = await replicas.read(keys, self.maps, send, call, failures_as_miss=failures_as_miss, start=start)
        missing = [i for i, v in enumerate(result.values) if v is None]
        if missing and self.maps.changed_since(call.started):
            await self.maps.refresh()
            if self.maps.view.epoch != epoch:

                async def again_send(node: str, positions: list[int], timeout: float):
                    return await send(node, [missing[p] for p in positions], timeout)

                again = await replicas.read(
                    [keys[i] for i in missing], self.maps, again_send, call, failures_as_miss=failures_as_miss, start=start
                )
                for i, value, missed in zip(missing, again.values, again.missed_on):
                    result.values[i] = value
                    result.missed_on[i].extend(missed)
        return result

    # -- values --------------------------------------------------------------------

    async def get_values(self, keys: list[bytes], call: replicas.Call) -> list[bytes | None]:
        staging = self.nodes.staging
        if self.nodes.zero_copy and staging is not None:
            slot = ExtentAllocator.rounded(self._slot_hint)
            per_call = max(1, min(self.config.max_batch_keys, self.nodes.max_batch_bytes // slot))
            chunks = (self._get_staged(start, chunk, slot, call) for start, chunk in by_count(keys, per_call))
        else:
            chunks = (self._get_inline(start, chunk, call) for start, chunk in by_count(keys, self.config.max_batch_keys))
        parts = await bounded(chunks, self.config.concurrency)
        return [value for part in parts for value in part]

    async def _get_inline(self, start: int, keys: Sequence[bytes], call: replicas.Call) -> list[bytes | None]:
        """Values that come back in the responses."""

        async def send(node: str, positions: list[int], timeout: float) -> list[bytes | None]:
            return await self._values_from(node, [keys[p] for p in positions], timeout)

        result = await self._read(keys, send, call, start)
        self.repair.schedule(keys, result.values, result.missed_on)
        return result.values

    async def _values_from(self, node: str, keys: Sequence[bytes], timeout: float) -> list[bytes | None]:
        """One node's values of ``keys`` inline (over as many responses as it takes)."""
        out: list[bytes | None] = []
        check = TransitCheck(node)
        while len(out) < len(keys):
            request = data_pb2.GetRequest(namespace=self.namespace, keys=keys[len(out) :])
            response = await self.maps.call(node, "data", "Get", request, timeout)
            if not response.results:
                raise errors.InternalError("the daemon answered a Get with no results")
            for result in response.results:
                if not result.found:
                    out.append(None)
                    continue
                value = result.value
                if self.config.verify_checksums and (len(value) != result.length or checksum(value) != result.checksum):
                    check.failed(len(out))
                    break  # ask again from this key on
                out.append(value)
        return out

    async def _get_staged(self, start: int, keys, slot: int, call: replicas.Call) -> list[bytes | None]:
        """Let a replica write blocks into staging slots, then copy them out."""
        staging = self.nodes.staging
        base = await staging.acquire(slot * len(keys))
        if base is None:
            return await self._get_inline(start, keys, call)
        region = staging.region
        try:
            offsets = [base + j * slot for j in range(len(keys))]
            result = await self._read_into(keys, region, offsets, [slot] * len(keys), call, start)
            out: list[bytes | None] = []
            larger: list[int] = []
            for j, length in enumerate(result.values):
                if length is None:
                    out.append(None)
                elif length < 0:
                    out.append(None)
                    larger.append(j)
                else:
                    out.append(bytes(region.view(offsets[j], length)))
        finally:
            await staging.release(base, slot * len(keys))
        self.repair.schedule(keys, out, result.missed_on)
        seen = [len(v) for v in out if v is not None]
        if seen or larger:
            self._slot_hint = max(seen, default=self._slot_hint)
        for j in larger:  # blocks larger than the slot guess: ask again, sized exactly
            out[j] = await self._get_one_exact(keys[j], start + j, call)
        return out

    async def _get_one_exact(self, key: bytes, position: int, call: replicas.Call) -> bytes | None:
        staging = self.nodes.staging
        size = self._slot_hint
        for _ in range(2):  # the block may be overwritten by a larger one in between
            base = await staging.acquire(size)
            if base is None:
                break
            try:
                result = await self._read_into([key], staging.region, [base], [size], call, position)
                length = result.values[0]
                if length is not None and length >= 0:
                    return bytes(staging.region.view(base, length))
            finally:
                await staging.release(base, size)
            if length is None:
                return None
            size = -length
        return (await self._get_inline(position, [key], call))[0]

    # -- into a region -----------------------------------------------------------------

    async def get_into(self, keys: list[bytes], region: MemoryRegion, offsets, capacities, call: replicas.Call) -> list[int | None]:
        """Per key the bytes written into ``region``, None on a miss, ``-length`` when it did not fit."""

        async def chunk(start: int, idx: Sequence[int]) -> list[int | None]:
            sub = [keys[i] for i in idx]
            offs = [offsets[i] for i in idx]
            result = await self._read_into(sub, region, offs, [capacities[i] for i in idx], call, start)
            if any(result.missed_on):
                values = [
                    bytes(region.view(o, n)) if n is not None and n >= 0 and missed else None
                    for o, n, missed in zip(offs, result.values, result.missed_on)
                ]
                self.repair.schedule(sub, values, result.missed_on)
            return result.values

        positions = list(range(len(keys)))
        parts = await bounded((chunk(s, idx) for s, idx in by_count(positions, self.config.max_batch_keys)), self.config.concurrency)
        return [r for part in parts for r in part]

    async def _read_into(self, keys, region: MemoryRegion, offsets, capacities, call: replicas.Call, start: int):
        async def send(node: str, positions: list[int], timeout: float) -> list[int | None]:
            sub = [keys[p] for p in positions]
            offs = [offsets[p] for p in positions]
            caps = [capacities[p] for p in positions]
            if region.zero_copy and self.nodes.zero_copy_to(self.maps.view.addresses[node]):
                return await self._region_from(node, sub, region, offs, caps, timeout)
            return await self._inline_into(node, sub, region, offs, caps, timeout)

        return await self._read(keys, send, call, start)

    async def _region_from(self, node: str, keys, region: MemoryRegion, offsets, capacities, timeout: float) -> list[int | None]:
        """One zero-copy Get from ``node``, verified over the region's bytes."""
        request = data_pb2.GetRequest(
            namespace=self.namespace,
            keys=keys,
            region=region.wire(),
            slots=[data_pb2.RemoteSlot(address=region.address + o, capacity=c) for o, c in zip(offsets, capacities)],
        )
        check = TransitCheck(node)
        while True:
            try:
                response = await self.maps.call(node, "data", "Get", request, timeout)
            except errors.KVStoreError as exc:
                if fallback_of(exc) is not Fallback.INLINE:
                    raise
                return await self._inline_into(node, keys, region, offsets, capacities, timeout)
            if len(response.results) != len(keys):
                raise errors.InternalError(f"the daemon answered {len(response.results)} of {len(keys)} keys")
            out: list[int | None] = []
            corrupt = None
            # Over shared memory the daemon verified each block while it copied it.
            verify = self.config.verify_checksums and not response.shared_memory
            for j, (result, offset) in enumerate(zip(response.results, offsets)):
                if not result.found:
                    out.append(None)
                elif result.too_small:
                    out.append(-result.length)
                else:
                    if verify and corrupt is None and region.checksum(offset, result.length) != result.checksum:
                        corrupt = j
                    out.append(result.length)
            if corrupt is None:
                return out
            check.failed(corrupt)

    async def _inline_into(self, node: str, keys, region: MemoryRegion, offsets, capacities, timeout: float) -> list[int | None]:
        """Blocks that travel inline (no data plane, or too large for the daemon to stage), then land in the region."""
        out: list[int | None] = []
        for value, offset, capacity in zip(await self._values_from(node, keys, timeout), offsets, capacities):
            if value is None:
                out.append(None)
            elif len(value) > capacity:
                out.append(-len(value))
            else:
                region.view(offset, len(value))[:] = value
                out.append(len(value))
        return out

    # -- presence ----------------------------------------------------------------------

    async def exists(self, keys: list[bytes], call: replicas.Call) -> list[bool]:
        chunks = (self._exists_chunk(start, chunk, call) for start, chunk in by_count(keys, self.config.max_batch_keys))
        parts = await bounded(chunks, self.config.concurrency)
        return [e for part in parts for e in part]

    async def _exists_chunk(self, start: int, keys: Sequence[bytes], call: replicas.Call) -> list[bool]:
        async def send(node: str, positions: list[int], timeout: float) -> list[bool | None]:
            request = data_pb2.KeysRequest(namespace=self.namespace, keys=[keys[p] for p in positions])
            response = await self.maps.call(node, "data", "Exists", request, timeout)
            return [True if e else None for e in response.exists]

        result = await self._read(keys, send, call, start)
        return [bool(v) for v in result.values]

    async def lookup_prefix(self, keys: list[bytes], call: replicas.Call) -> int:
        """How many leading keys are stored. A cluster of one counts them on the
        daemon (LookupPrefix: one integer back instead of a flag per key);
        elsewhere a chain's keys live on different nodes, so each chunk's
        presence is asked of its keys' replicas (Exists) and counted here."""
        total = 0
        for start, chunk in by_count(keys, self.config.max_batch_keys):
            count = await self._leading(start, chunk, call)
            total += count
            if count < len(chunk):
                break
        return total

    async def _leading(self, start: int, keys: Sequence[bytes], call: replicas.Call) -> int:
        node = self.maps.view.sole_node
        if node is not None:
            request = data_pb2.KeysRequest(namespace=self.namespace, keys=keys)
            try:
                return (await self.maps.call(node, "data", "LookupPrefix", request, call.attempt_timeout())).count
            except errors.KVStoreError as exc:
                if not exc.retryable:
                    raise
                log.debug("LookupPrefix on %s failed (%s); asking with Exists", node, exc)
        present = await self._exists_chunk(start, keys, call)
        return present.index(False) if False in present else len(present)

    # -- listing -------------------------------------------------------------------------

    async def list(self, prefix: bytes, limit: int | None) -> list[tuple[bytes, int]]:
        """(key, length) of stored blocks under ``prefix``, in key order, across the cluster."""
        timeout = self.maps.new_call().attempt_timeout()

        async def pages(node: str) -> list[tuple[bytes, int]]:
            out: list[tuple[bytes, int]] = []
            after = b""
            while limit is None or len(out) < limit:
                page = LIST_PAGE if limit is None else min(LIST_PAGE, limit - len(out))
                request = data_pb2.ListRequest(namespace=self.namespace, prefix=prefix, start_after=after, limit=page)
                response = await self.maps.call(node, "data", "List", request, timeout)
                out.extend((e.key, e.length) for e in response.entries)
                if not response.truncated or not response.entries:
                    break
                after = response.entries[-1].key
            return out

        merged: dict[bytes, int] = {}
        for answer in answers(await self.maps.every_node(pages), "data.List"):
            merged.update(answer)
        entries = sorted(merged.items())
        return entries if limit is None else entries[:limit]
