"""BlockStore: the daemon's storage API, called by the RPC layer on the event loop.

A put reserves arena room (evicting clean LRU blocks), then on an I/O thread
copies the value into the arena and appends it to disk, then publishes it in
the memory index. A get is served from the arena when resident, else read from
disk, verified against its checksum, and promoted into the arena.

The path of a zero-copy put: rpc.handlers (parsing, errors, metrics) ->
rpc.data (validation) -> dataplane (one ``Transfer`` for the request's session
and region, RMA or shared memory) -> here, ``put_remote``: arena extents are
reserved in the memory tier (memory.py), the transfer fills them, checksums are
verified, the blocks are appended to the disk tier (disk.py) as the durability
asks, then published in the memory index. Storage only knows the ``Transfer``
interface (transfer.py), never the RPC layer or the data plane behind it.

Nothing outside server/storage touches the tiers: callers use ``stats()``,
``namespaces()``, ``scan()``, ``prefault()`` and ``arena_buffer()`` (the one
buffer the data plane registers and copies through).

Blocking work (copies, file I/O, RocksDB) runs on a thread pool; the memory
index is only touched on the loop, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvstore.checksum import checksum as xxh3
from kvstore.durability import Durability
from kvstore.errors import InvalidArgumentError, KVStoreError, ResourceExhaustedError, UnavailableError
from kvstore.namespace import Namespace
from kvstore.protocol.codes import ErrorCode
from kvstore.server.storage.disk import DiskTier, NamespaceCounters
from kvstore.server.storage.memory import MemoryTier, Resident
from kvstore.server.storage.transfer import Transfer
from kvstore.server.storage.writeback import WriteBack

log = logging.getLogger("kvstore.server.store")

WRITEBACK_DELAY = 1.0  # seconds a "memory" put may wait for its write-back (server/storage/writeback.py)


@dataclass(slots=True)
class BlockIn:
    """One validated block of a put."""

    key: bytes  # storage key
    value: object  # bytes-like
    length: int
    checksum: int


@dataclass(slots=True)
class BlockOut:
    value: bytes  # or a memoryview over the bytes read from disk
    checksum: int
    length: int
    seq: int = 0  # the write it came from (for promotion into the arena); 0 when served from memory


@dataclass(frozen=True, slots=True)
class TierStats:
    blocks: int
    bytes: int
    capacity_bytes: int
    resident_bytes: int = 0  # memory: arena bytes faulted in so far (prefault)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """The store's counters as ServerStats and the metrics report them."""

    data_dir: str
    memory: TierStats
    disk: TierStats
    namespaces: int  # namespaces the disk tier keeps counters for
    corrupt_blocks: int  # dropped because they failed their checksum
    evictions: int  # clean blocks evicted from the memory tier
    arena_used_bytes: int  # arena extents allocated (published, reserved or in transfer)


class _Sequence:
    """Monotonic write sequence, above every sequence a previous process used."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns())
        return self._last


class BlockStore:
    def __init__(
        self,
        data_dir: Path,
        *,
        memory_bytes: int,
        segment_size: int,
        sync_window: float,
        io_threads: int,
        writeback_delay: float = WRITEBACK_DELAY,
    ) -> None:
        self.memory = MemoryTier(memory_bytes)
        self.disk = DiskTier(Path(data_dir), segment_size=segment_size, sync_window=sync_window)
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvstore-io")
        self.writeback = WriteBack(
            self.memory, self.disk, delay=writeback_delay, high_water=memory_bytes // 4, on_clean=self._space_freed
        )
        self._seq = _Sequence()
        self._closed = False
        self._deletes = 0  # bumped by every delete: stale copies must not be republished
        self._background: set[asyncio.Task] = set()
        self._space = asyncio.Event()  # set (and replaced) whenever arena room is freed
        self.reserve_timeout = 10.0
        self.promote_limit = memory_bytes // 8

    async def offload(self, fn, *args):
        """Run blocking work (copies, checksums, serialisation) on the I/O pool."""
        return await self._run(fn, *args)

    async def _run(self, fn, *args):
        if self._closed:
            raise UnavailableError("the daemon is shutting down", code=ErrorCode.SHUTTING_DOWN)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- put ---------------------------------------------------------------

    async def put(self, ns: Namespace, blocks: list[BlockIn], durability: Durability) -> int:
        """Store a validated batch of inline values; returns once each reached ``durability``."""
        deletes_before = self._deletes
        seqs = [self._seq.next() for _ in blocks]
        slots = [self.memory.reserve(block.length) for block in blocks]
        # "memory" puts that found no arena room are written through to disk instead.
        to_disk = [durability != Durability.MEMORY or slot is None for slot in slots]
        if None in slots:
            self.writeback.hurry()  # so that later puts find room again
        try:
            await self._run(self._fill_and_persist, blocks, slots, seqs, to_disk, durability == Durability.SYNC)
        except BaseException:
            self._release(slots, [block.length for block in blocks])
            raise
        self._publish(blocks, slots, seqs, to_disk, deletes_before)
        return len(blocks)

    async def put_remote(
        self, ns: Namespace, blocks: list[BlockIn], durability: Durability, transfer: Transfer, addresses: list[int]
    ) -> int:
        """Store a batch whose bytes the data plane moves straight into the arena.

        ``transfer.read_into_arena`` fills the extents reserved for the blocks
        with the client's bytes at ``addresses`` (one per block) and returns None,
        or the xxh3-64 of each block it copied (hashed on the way). Checksums are
        verified before anything is persisted or published: those returned, else
        over the arena bytes. A block whose ``checksum`` is None takes the one
        computed here. A batch larger than a quarter of the arena is taken in
        parts, one after the other. On any failure every extent reserved for the
        failing part is released.
        """
        parts = self._parts([block.length for block in blocks])
        if len(parts) == 1:  # the usual case: no per-block regrouping
            await self._put_remote_part(blocks, parts[0], addresses, durability, transfer)
            return len(blocks)
        for indices in parts:
            await self._put_remote_part(
                [blocks[i] for i in indices], indices, [addresses[i] for i in indices], durability, transfer
            )
        return len(blocks)

    async def _put_remote_part(
        self, blocks: list[BlockIn], indices: list[int], addresses: list[int], durability: Durability, transfer: Transfer
    ) -> None:
        deletes_before = self._deletes
        sizes = [block.length for block in blocks]
        seqs = [self._seq.next() for _ in blocks]
        slots = await self._reserve_all(sizes)
        persist = durability != Durability.MEMORY
        try:
            try:
                checksums = await transfer.read_into_arena(slots, addresses, sizes)
            except KVStoreError as exc:
                raise _about_request(exc, indices) from None
            if checksums is None or persist:
                await self._run(self._verify_and_persist, blocks, indices, slots, seqs, persist, durability == Durability.SYNC, checksums)
            else:
                _verify(blocks, indices, checksums)  # numbers only: no need to leave the loop
        except BaseException:
            self._release(slots, sizes)
            raise
        self._publish(blocks, slots, seqs, [persist] * len(blocks), deletes_before)

    def _parts(self, lengths: list[int | None]) -> list[list[int]]:
        """Indices grouped so that each group's bytes fit a quarter of the arena."""
        budget = max(1, self.memory.capacity // 4)
        parts: list[list[int]] = [[]]
        used = 0
        for i, length in enumerate(lengths):
            length = length or 0
            if parts[-1] and used + length > budget:
                parts.append([])
                used = 0
            parts[-1].append(i)
            used += length
        return parts if parts[0] else []

    def _verify_and_persist(self, blocks, indices, slots, seqs, persist: bool, sync: bool, checksums=None) -> None:
        arena = self.memory.arena
        views = [arena.view(slot, block.length) for block, slot in zip(blocks, slots)]
        _verify(blocks, indices, checksums if checksums is not None else [xxh3(view) for view in views])
        if persist:
            writes = [
                self.disk.append(block.key, view, block.length, block.checksum, seq)
                for block, view, seq in zip(blocks, views, seqs)
            ]
            self.disk.commit(writes, sync=sync)

    def _publish(self, blocks, slots, seqs, persisted, deletes_before: int) -> None:
        dirty: list[Resident] = []
        for block, slot, seq, on_disk in zip(blocks, slots, seqs, persisted):
            if slot is None:
                self.memory.remove(block.key)  # an older resident copy is stale now
                continue
            if on_disk and self._deletes != deletes_before:
                # A delete ran meanwhile; the disk index alone knows which came last.
                self.memory.release(slot, block.length)
                self.memory.remove(block.key)
                continue
            entry = self.memory.publish(block.key, slot, block.length, block.checksum, seq, dirty=not on_disk)
            if entry is not None and entry.dirty:
                dirty.append(entry)
        if dirty:
            self.writeback.add(dirty)

    def _release(self, slots, sizes) -> None:
        for slot, size in zip(slots, sizes):
            if slot is not None:
                self.memory.release(slot, size)
        self._space_freed()

    def _space_freed(self) -> None:
        self._space.set()
        self._space = asyncio.Event()

    async def _reserve_all(self, sizes: list[int]) -> list[int]:
        """Arena extents for every size, all or none, waiting a while for room."""
        too_big = [n for n in sizes if n > self.memory.max_block]
        if too_big:
            raise ResourceExhaustedError(
                f"a block of {too_big[0]} bytes exceeds the memory tier's largest extent "
                f"({self.memory.max_block} bytes); send it inline or raise --memory",
                code=ErrorCode.BLOCK_EXCEEDS_MEMORY_TIER,
            )
        deadline = time.monotonic() + self.reserve_timeout
        while True:
            slots = []
            for n in sizes:
                slot = self.memory.reserve(n)
                if slot is None:
                    break
                slots.append(slot)
            if len(slots) == len(sizes):
                return slots
            for slot, n in zip(slots, sizes):
                self.memory.release(slot, n)
            self.writeback.hurry()  # dirty blocks cannot be evicted: make them clean
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResourceExhaustedError(
                    "the memory tier is full of blocks in transfer or not yet written back; retry",
                    code=ErrorCode.CAPACITY_EXHAUSTED,
                )
            event = self._space
            try:
                await asyncio.wait_for(event.wait(), min(remaining, 0.01))
            except asyncio.TimeoutError:
                pass

    def _fill_and_persist(self, blocks, slots, seqs, to_disk, sync: bool) -> None:
        arena = self.memory.arena
        for block, slot in zip(blocks, slots):
            if slot is not None:
                arena.view(slot, block.length)[:] = memoryview(block.value).cast("B")
        writes = [
            self.disk.append(block.key, block.value, block.length, block.checksum, seq)
            for block, seq, persist in zip(blocks, seqs, to_disk)
            if persist
        ]
        self.disk.commit(writes, sync=sync)

    # -- get ---------------------------------------------------------------

    async def get(self, keys: list[bytes], budget: int) -> list[BlockOut | None]:
        """Values for a leading part of ``keys`` whose total size stays within ``budget``
        (at least one key is always answered)."""
        pinned: list[Resident] = []
        plan: list[Resident | None] = []
        for key in keys:
            entry = self.memory.lookup(key)
            if entry is not None:
                self.memory.pin(entry)
                pinned.append(entry)
            plan.append(entry)
        try:
            results = await self._run(self._read_batch, keys, plan, budget)
        finally:
            for entry in pinned:
                self.memory.unpin(entry)
            if pinned:
                self._space_freed()
        for key, block, entry in zip(keys, results, plan):
            if entry is None and block is not None and block.length <= self.promote_limit:
                self._spawn(self._promote(key, block))
        return results

    async def get_remote(
        self, keys: list[bytes], capacities: list[int], addresses: list[int], transfer: Transfer
    ) -> list[tuple[int, int, bool] | None]:
        """(length, checksum, written) per key, None per miss, after
        ``transfer.write_from_arena`` wrote each found block that fits into the
        client's slot of ``capacities[i]`` bytes at ``addresses[i]`` (``written`` is
        False for a block larger than its slot). A transfer that returns the
        checksums of the bytes it copied has a block that no longer matches its
        own answered as a miss, and dropped.

        Blocks only on disk are first read into the arena (verified, and promoted
        as clean copies), so every byte leaves from registered memory. A batch
        larger than a quarter of the arena is served in parts.
        """
        lengths: list[int | None] = []
        for key in keys:
            entry = self.memory.lookup(key)
            lengths.append(entry.length if entry is not None else None)
        unknown = [i for i, n in enumerate(lengths) if n is None]
        if unknown:
            records = await self._run(lambda: [self.disk.lookup(keys[i]) for i in unknown])
            for i, record in zip(unknown, records):
                lengths[i] = record.length if record is not None else None
        parts = self._parts(lengths)
        if len(parts) == 1:  # the usual case: no per-block regrouping
            return await self._get_remote_part(keys, capacities, addresses, transfer)
        results: list[tuple[int, int, bool] | None] = [None] * len(keys)
        for indices in parts:
            try:
                part = await self._get_remote_part(
                    [keys[i] for i in indices], [capacities[i] for i in indices], [addresses[i] for i in indices], transfer
                )
            except KVStoreError as exc:
                raise _about_request(exc, indices) from None
            for i, result in zip(indices, part):
                results[i] = result
        return results

    async def _get_remote_part(
        self, keys, capacities, addresses, transfer: Transfer
    ) -> list[tuple[int, int, bool] | None]:
        pinned: list[Resident | None] = [None] * len(keys)
        try:
            for i, key in enumerate(keys):
                entry = self.memory.lookup(key)
                if entry is not None:
                    self.memory.pin(entry)
                    pinned[i] = entry
            missing = [i for i, entry in enumerate(pinned) if entry is None]
            if missing:
                await self._load_into_arena(keys, missing, pinned)
            fits = [j for j, e in enumerate(pinned) if e is not None and e.length <= capacities[j]]
            try:
                checksums = await transfer.write_from_arena(
                    [pinned[j].offset for j in fits], [addresses[j] for j in fits], [pinned[j].length for j in fits]
                )
            except KVStoreError as exc:  # about the j-th block copied: the request's fits[j]
                raise _about_request(exc, fits) from None
            results = [
                None if e is None else (e.length, e.checksum, e.length <= capacity)
                for e, capacity in zip(pinned, capacities)
            ]
            # A transfer that hashed the arena bytes as it copied them: a block that no
            # longer matches its checksum is never returned (a miss, counted, dropped).
            for j, actual in zip(fits, checksums or ()):
                if actual != pinned[j].checksum:
                    results[j] = None
                    self._drop_corrupt(pinned[j])
            return results
        finally:
            for entry in pinned:
                if entry is not None:
                    self.memory.unpin(entry)
            self._space_freed()

    def _drop_corrupt(self, entry: Resident) -> None:
        self.disk._count_corrupt(entry.key, f"the memory tier's copy failed its checksum (arena offset {entry.offset})")
        if self.memory.lookup(entry.key) is entry:
            self.memory.remove(entry.key)  # a clean block is read from disk next time

    async def _load_into_arena(self, keys, positions: list[int], pinned: list) -> None:
        """Read the blocks at ``positions`` from disk into pinned arena extents."""
        deletes_before = self._deletes
        reads = await self._run(lambda: [self.disk.read(keys[i]) for i in positions])
        hits = [(i, found) for i, found in zip(positions, reads) if found is not None]
        if not hits:
            return
        slots = await self._reserve_all([record.length for _, (_, record) in hits])
        try:
            await self._run(self._copy_into_arena, [(slot, data) for slot, (_, (data, _)) in zip(slots, hits)])
        except BaseException:
            self._release(slots, [record.length for _, (_, record) in hits])
            raise
        raced = self._deletes != deletes_before
        for slot, (i, (_, record)) in zip(slots, hits):
            key = keys[i]
            entry = None
            if raced:
                # Some delete ran while we read (of this key or any other): the
                # index says whether what we read is still this key's block.
                current = self.disk.lookup(key)
                still = current is not None and current.seq == record.seq
            if not raced or still:
                entry = self.memory.publish(key, slot, record.length, record.checksum, record.seq, dirty=False)
            else:
                self.memory.release(slot, record.length)
            if entry is None:  # a newer write or a delete won meanwhile: serve what is current
                entry = self.memory.lookup(key)
            if entry is not None:
                self.memory.pin(entry)
                pinned[i] = entry

    def _copy_into_arena(self, copies) -> None:
        arena = self.memory.arena
        for slot, data in copies:
            arena.view(slot, len(data))[:] = data

    def _read_batch(self, keys, plan, budget):
        out = []
        used = 0
        for key, entry in zip(keys, plan):
            if out and used >= budget:
                break
            if entry is not None:
                data = bytes(self.memory.arena.view(entry.offset, entry.length))
                out.append(BlockOut(data, entry.checksum, entry.length))
                used += entry.length
                continue
            found = self.disk.read(key)
            if found is None:
                out.append(None)
                continue
            data, record = found
            out.append(BlockOut(data, record.checksum, record.length, record.seq))
            used += record.length
        return out

    async def _promote(self, key: bytes, block: BlockOut) -> None:
        """Copy a block read from disk into the arena, off the request's path."""
        if key in self.memory or self._closed:
            return
        slot = self.memory.reserve(block.length)
        if slot is None:
            return
        deletes_before = self._deletes
        view = self.memory.arena.view(slot, block.length)
        try:
            await self._run(view.__setitem__, slice(None), block.value)
        except BaseException:
            self.memory.release(slot, block.length)
            raise
        if self._deletes != deletes_before or key in self.memory:
            self.memory.release(slot, block.length)
            return
        self.memory.publish(key, slot, block.length, block.checksum, block.seq, dirty=False)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- presence ----------------------------------------------------------

    async def exists(self, keys: list[bytes]) -> list[bool]:
        present = [key in self.memory for key in keys]
        missing = [key for key, hit in zip(keys, present) if not hit]
        if missing:
            on_disk = iter(await self._run(self.disk.contains, missing))
            present = [hit or next(on_disk) for hit in present]
        return present

    async def lookup_prefix(self, keys: list[bytes]) -> int:
        count = 0
        for start in range(0, len(keys), 64):
            chunk = keys[start : start + 64]
            for hit in await self.exists(chunk):
                if not hit:
                    return count
                count += 1
        return count

    # -- delete, list, namespaces -------------------------------------------

    async def delete(self, keys: list[bytes]) -> int:
        self._deletes += 1
        in_memory_only = 0
        unique = list(dict.fromkeys(keys))
        for key in unique:
            entry = self.memory.lookup(key)
            if entry is not None and entry.writeback is not None and not entry.writeback.done():
                await entry.writeback  # so a finishing write-back cannot resurrect the key
            entry = self.memory.lookup(key)
            if entry is not None and entry.dirty:
                in_memory_only += 1  # never reached disk, so disk.delete will not count it
            self.memory.remove(key)
        on_disk = await self._run(self.disk.delete, unique)
        return on_disk + in_memory_only

    async def list(self, ns: Namespace, prefix: bytes, start_after: bytes, limit: int):
        full_prefix = ns.prefix + prefix
        after = ns.prefix + start_after if start_after else b""
        entries, truncated = await self._run(self.disk.scan, full_prefix, after, limit)
        dirty = {
            e.key: e.length
            for e in self.memory.dirty_entries()
            if e.key.startswith(full_prefix) and (not after or e.key > after)
        }
        if dirty:
            merged = dict(entries)
            merged.update(dirty)
            ordered = sorted(merged.items())
            truncated = truncated or len(ordered) > limit
            entries = ordered[:limit]
        cut = len(ns.prefix)
        return [(key[cut:], length) for key, length in entries], truncated

    def namespaces(self) -> list[Namespace]:
        """Every namespace the disk tier keeps counters for, ordered by name."""
        return [ns for ns, _ in self.disk.namespace_stats()]

    async def scan(self, ns: Namespace, after: bytes, limit: int) -> tuple[list[tuple[bytes, int]], bool]:
        """One page of the persisted blocks of ``ns``, in key order: up to ``limit``
        (storage key, length) pairs after the storage key ``after`` (b"" for the
        first page), and whether more follow. Blocks only in memory (not yet
        written back) are not included."""
        return await self._run(self.disk.scan, ns.prefix, after, limit)

    def namespace_counters(self, ns: Namespace) -> NamespaceCounters:
        dirty = [e for e in self.memory.dirty_entries() if e.key.startswith(ns.prefix)]
        return self.disk.counters_with(ns.prefix, dirty)

    async def drop_namespace(self, ns: Namespace) -> NamespaceCounters:
        self._deletes += 1
        counters = self.namespace_counters(ns)
        for entry in [e for e in self.memory.dirty_entries() if e.key.startswith(ns.prefix)]:
            if entry.writeback is not None and not entry.writeback.done():
                await entry.writeback
        self.memory.remove_prefix(ns.prefix)
        await self._run(self.disk.drop_namespace, ns)
        return counters

    # -- statistics --------------------------------------------------------

    def stats(self) -> StoreStats:
        memory, disk = self.memory, self.disk
        arena = memory.arena
        disk_blocks, disk_bytes = disk.totals()
        return StoreStats(
            data_dir=str(disk.data_dir),
            memory=TierStats(len(memory), memory.bytes, memory.capacity, arena.resident_bytes),
            disk=TierStats(disk_blocks, disk_bytes, shutil.disk_usage(disk.data_dir).total),
            namespaces=len(disk.namespaces),
            corrupt_blocks=disk.corrupt_blocks,
            evictions=memory.evictions,
            arena_used_bytes=arena.allocator.used,
        )

    # -- the arena, for the data plane ----------------------------------------

    def arena_buffer(self) -> memoryview:
        """The memory tier's arena as one writable buffer: the data plane registers
        it once and moves bytes through it at the offsets it is handed by
        ``put_remote`` and ``get_remote``. Nothing else may write to it."""
        return self.memory.arena.buffer

    def prefault(self) -> None:
        """Fault the arena's pages in on a background thread (see Arena.prefault)."""
        self.memory.arena.prefault()

    # -- lifecycle ---------------------------------------------------------

    async def flush(self) -> None:
        """Write back every dirty block now, then make everything written durable."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.writeback.drain()
        await self._run(self.disk.flush)

    async def close(self) -> None:
        if self._closed:
            return
        await self.flush()
        self._closed = True
        await self.writeback.close()
        self._pool.shutdown(wait=True)
        self.disk.close()
        self.memory.close()


def _verify(blocks: list[BlockIn], indices: list[int], checksums: list[int]) -> None:
    """Check the xxh3-64 of each block's bytes as stored against its writer's; a block
    that came without one (``checksum`` None) takes the stored bytes' own."""
    for i, block, actual in zip(indices, blocks, checksums):
        if block.checksum is None:
            block.checksum = actual
        elif actual != block.checksum:
            raise InvalidArgumentError(
                f"block {i}: xxh3-64 checksum {block.checksum:#018x} does not match the bytes read "
                "from the client's region",
                code=ErrorCode.CHECKSUM_MISMATCH,
                index=i,
            )


def verify_block(value, length: int, expected: int, index: int) -> None:
    """Raise InvalidArgumentError unless ``value`` has ``length`` bytes and checksum ``expected``."""
    actual_length = len(value)
    if actual_length != length:
        raise InvalidArgumentError(
            f"block {index}: length is {length} but the value has {actual_length} bytes",
            code=ErrorCode.LENGTH_MISMATCH,
            index=index,
        )
    if xxh3(value) != expected:
        raise InvalidArgumentError(
            f"block {index}: xxh3-64 checksum {expected:#018x} does not match the value's bytes",
            code=ErrorCode.CHECKSUM_MISMATCH,
            index=index,
        )


def _about_request(exc: KVStoreError, positions) -> KVStoreError:
    """An error about entry j of a transfer (or a part), told about the request's entry ``positions[j]``."""
    if 0 <= exc.index < len(positions):
        exc.index = positions[exc.index]
    return exc
