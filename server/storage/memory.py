"""The memory tier: an index of blocks resident in the arena, with LRU eviction.

Only the event-loop thread mutates this index. Byte copies into and out of the
arena run on I/O threads while the block is pinned, so eviction or an
overwrite never recycles an extent that a copy is still using.

A block is *dirty* while it exists only here (durability "memory", not yet
written back); dirty blocks are never evicted. Clean blocks are on disk too and
sit in the LRU, from which the allocator takes room when the arena is full.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from kvstore.server.storage.arena import Arena


@dataclass(eq=False)
class Resident:
    key: bytes  # storage key: namespace prefix + user key
    offset: int
    length: int
    checksum: int
    seq: int
    dirty: bool
    pins: int = 0
    retired: bool = False  # replaced or removed while pinned: free on last unpin
    writeback: object | None = field(default=None, repr=False)  # asyncio.Future while written back


class MemoryTier:
    def __init__(self, capacity: int, *, max_block_fraction: float = 0.5) -> None:
        self.arena = Arena(capacity)
        self.capacity = capacity
        self.max_block = int(capacity * max_block_fraction)
        self._index: dict[bytes, Resident] = {}
        self._lru: OrderedDict[bytes, Resident] = OrderedDict()  # clean, unpinned
        self._dirty: dict[bytes, Resident] = {}
        self.bytes = 0
        self.dirty_bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    # -- reservation and publication (puts) ---------------------------------

    def reserve(self, nbytes: int) -> int | None:
        """An arena offset for ``nbytes``, evicting clean LRU blocks if needed; None if no room."""
        if nbytes > self.max_block:
            return None
        offset = self.arena.allocate(nbytes)
        while offset is None and self._lru:
            _, victim = self._lru.popitem(last=False)
            self._drop(victim)
            self.evictions += 1
            offset = self.arena.allocate(nbytes)
        return offset

    def release(self, offset: int, nbytes: int) -> None:
        """Give back a reservation that was never published."""
        self.arena.free(offset, nbytes)

    def publish(self, key: bytes, offset: int, length: int, checksum: int, seq: int, *, dirty: bool) -> Resident | None:
        """Make a filled reservation visible; returns None (and frees it) if a newer write won."""
        current = self._index.get(key)
        if current is not None and current.seq > seq:
            self.arena.free(offset, length)
            return None
        if current is not None:
            self._drop(current)
        entry = Resident(key, offset, length, checksum, seq, dirty)
        self._index[key] = entry
        self.bytes += length
        if dirty:
            self.dirty_bytes += length
            self._dirty[key] = entry
        else:
            self._lru[key] = entry
        return entry

    def mark_clean(self, entry: Resident) -> None:
        if entry.dirty and not entry.retired:
            entry.dirty = False
            self.dirty_bytes -= entry.length
            del self._dirty[entry.key]
            if entry.pins == 0:
                self._lru[entry.key] = entry

    # -- reads -------------------------------------------------------------

    def lookup(self, key: bytes) -> Resident | None:
        entry = self._index.get(key)
        if entry is not None and not entry.dirty and entry.pins == 0:
            self._lru.move_to_end(key)
        return entry

    def pin(self, entry: Resident) -> None:
        if entry.pins == 0:
            self._lru.pop(entry.key, None)
        entry.pins += 1

    def unpin(self, entry: Resident) -> None:
        entry.pins -= 1
        if entry.pins:
            return
        if entry.retired:
            self.arena.free(entry.offset, entry.length)
        elif not entry.dirty:
            self._lru[entry.key] = entry

    # -- removal -----------------------------------------------------------

    def remove(self, key: bytes) -> Resident | None:
        entry = self._index.get(key)
        if entry is not None:
            self._drop(entry)
        return entry

    def remove_prefix(self, prefix: bytes) -> int:
        doomed = [entry for key, entry in self._index.items() if key.startswith(prefix)]
        for entry in doomed:
            self._drop(entry)
        return len(doomed)

    def dirty_entries(self) -> list[Resident]:
        return list(self._dirty.values())

    def _drop(self, entry: Resident) -> None:
        del self._index[entry.key]
        self._lru.pop(entry.key, None)
        self.bytes -= entry.length
        if entry.dirty:
            self.dirty_bytes -= entry.length
            entry.dirty = False
            del self._dirty[entry.key]
        entry.retired = True
        if entry.pins == 0:
            self.arena.free(entry.offset, entry.length)

    def close(self) -> None:
        self._index.clear()
        self._lru.clear()
        self._dirty.clear()
        self.arena.close()
