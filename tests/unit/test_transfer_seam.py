"""BlockStore through its Transfer seam (server/storage/transfer.py), with no RPC
layer and no data plane: a fake client region stands in for RMA or shared
memory. Also the store's read-only surface (stats, namespaces, scan) that the
admin service, the metrics and the rebalancer use instead of the tiers."""

from __future__ import annotations

import asyncio
import os
import traceback

import pytest

from kvstore.checksum import checksum
from kvstore.errors import InvalidArgumentError
from kvstore.namespace import Namespace
from kvstore.protocol.codes import ErrorCode
from kvstore.server.storage.store import BlockIn, BlockStore

NS = Namespace("t", "seam")
BASE = 1 << 40  # the client's address of its region: addresses are never arena offsets


class FakeRegion:
    """A client region: ``Transfer`` over a bytearray, hashing as it copies or not."""

    def __init__(self, size: int, *, hashes: bool, corrupt_on_write: bool = False) -> None:
        self.memory = bytearray(size)
        self.checksums_while_copying = hashes
        self.corrupt_on_write = corrupt_on_write
        self.calls: list[tuple[str, list[int], list[int]]] = []
        self.store: BlockStore | None = None

    def place(self, offset: int, data: bytes) -> int:
        self.memory[offset : offset + len(data)] = data
        return BASE + offset

    async def read_into_arena(self, arena_offsets, remote_addresses, sizes):
        self.calls.append(("read", list(remote_addresses), list(sizes)))
        arena = self.store.arena_buffer()
        for offset, address, size in zip(arena_offsets, remote_addresses, sizes):
            arena[offset : offset + size] = self.memory[address - BASE : address - BASE + size]
        if not self.checksums_while_copying:
            return None
        return [checksum(self.memory[a - BASE : a - BASE + n]) for a, n in zip(remote_addresses, sizes)]

    async def write_from_arena(self, arena_offsets, remote_addresses, lengths):
        self.calls.append(("write", list(remote_addresses), list(lengths)))
        arena = self.store.arena_buffer()
        sums = []
        for offset, address, length in zip(arena_offsets, remote_addresses, lengths):
            data = bytes(arena[offset : offset + length])
            self.memory[address - BASE : address - BASE + length] = data
            sums.append(checksum(data) ^ (1 if self.corrupt_on_write else 0))
        return sums if self.checksums_while_copying else None


@pytest.fixture
async def store(tmp_path):
    made = BlockStore(tmp_path, memory_bytes=8 << 20, segment_size=4 << 20, sync_window=0, io_threads=2)
    yield made
    await made.close()


def region_for(store: BlockStore, size: int, **kwargs) -> FakeRegion:
    region = FakeRegion(size, **kwargs)
    region.store = store
    return region


@pytest.mark.parametrize("hashes", [False, True])
async def test_a_put_through_a_transfer_stores_the_client_bytes(store, hashes):
    region = region_for(store, 1 << 20, hashes=hashes)
    values = [os.urandom(1000 + i) for i in range(4)]
    addresses = [region.place(i * 4096, v) for i, v in enumerate(values)]
    blocks = [BlockIn(NS.storage_key(b"k%d" % i), None, len(v), checksum(v)) for i, v in enumerate(values)]
    assert await store.put_remote(NS, blocks, "disk", region, addresses) == 4
    assert region.calls == [("read", addresses, [len(v) for v in values])]
    found = await store.get([NS.storage_key(b"k%d" % i) for i in range(4)], 1 << 20)
    assert [bytes(b.value) for b in found] == values


async def test_a_transfer_that_hashes_gives_the_blocks_without_checksums_theirs(store):
    region = region_for(store, 1 << 20, hashes=True)
    value = b"x" * 5000
    blocks = [BlockIn(NS.storage_key(b"k"), None, len(value), None)]
    await store.put_remote(NS, blocks, "memory", region, [region.place(0, value)])
    assert blocks[0].checksum == checksum(value)
    (found,) = await store.get([NS.storage_key(b"k")], 1 << 20)
    assert found.checksum == checksum(value)


@pytest.mark.parametrize("hashes", [False, True])
async def test_a_checksum_mismatch_stores_nothing_and_releases_the_arena(store, hashes):
    region = region_for(store, 1 << 20, hashes=hashes)
    good, bad = b"g" * 3000, b"b" * 3000
    addresses = [region.place(0, good), region.place(8192, bad)]
    blocks = [
        BlockIn(NS.storage_key(b"good"), None, len(good), checksum(good)),
        BlockIn(NS.storage_key(b"bad"), None, len(bad), checksum(b"not what was sent")),
    ]
    try:
        await store.put_remote(NS, blocks, "disk", region, addresses)
    except InvalidArgumentError as exc:
        # Its frames hold views of the arena, which could then never be unmapped.
        traceback.clear_frames(exc.__traceback__)
        code, index = exc.code, exc.index
    else:
        pytest.fail("a block that fails its checksum was stored")
    assert code == ErrorCode.CHECKSUM_MISMATCH and index == 1
    assert await store.exists([NS.storage_key(b"good"), NS.storage_key(b"bad")]) == [False, False]
    assert store.stats().arena_used_bytes == 0


async def test_a_batch_larger_than_a_quarter_of_the_arena_goes_in_parts_with_its_own_addresses(store):
    region = region_for(store, 8 << 20, hashes=False)
    size = 1 << 20  # 8 MiB arena: two blocks per part
    values = [bytes([65 + i]) * size for i in range(5)]
    addresses = [region.place((4 - i) * size, v) for i, v in enumerate(values)]  # not in arena order
    blocks = [BlockIn(NS.storage_key(b"p%d" % i), None, size, checksum(v)) for i, v in enumerate(values)]
    await store.put_remote(NS, blocks, "disk", region, addresses)
    assert [addresses for _, addresses, _ in region.calls] == [addresses[0:2], addresses[2:4], addresses[4:5]]

    back = region_for(store, 8 << 20, hashes=False)
    slots = [BASE + i * size for i in range(5)]
    results = await store.get_remote([b.key for b in blocks], [size] * 5, slots, back)
    assert results == [(size, checksum(v), True) for v in values]
    assert [addresses for _, addresses, _ in back.calls] == [slots[0:2], slots[2:4], slots[4:5]]
    assert [bytes(back.memory[i * size : (i + 1) * size]) for i in range(5)] == values


async def test_a_get_writes_only_what_fits_and_answers_misses(store):
    await store.put(NS, [BlockIn(NS.storage_key(b"a"), b"a" * 100, 100, checksum(b"a" * 100))], "disk")
    await store.put(NS, [BlockIn(NS.storage_key(b"b"), b"b" * 900, 900, checksum(b"b" * 900))], "disk")
    region = region_for(store, 4096, hashes=False)
    keys = [NS.storage_key(k) for k in (b"a", b"missing", b"b")]
    results = await store.get_remote(keys, [512, 512, 512], [BASE, BASE + 512, BASE + 1024], region)
    assert results == [(100, checksum(b"a" * 100), True), None, (900, checksum(b"b" * 900), False)]
    assert region.calls == [("write", [BASE], [100])]
    assert bytes(region.memory[:100]) == b"a" * 100


async def test_a_block_whose_copy_fails_its_checksum_is_a_miss_and_counted(store):
    value = b"c" * 2048
    await store.put(NS, [BlockIn(NS.storage_key(b"c"), value, len(value), checksum(value))], "disk")
    before = store.stats().corrupt_blocks
    region = region_for(store, 4096, hashes=True, corrupt_on_write=True)
    assert await store.get_remote([NS.storage_key(b"c")], [4096], [BASE], region) == [None]
    assert store.stats().corrupt_blocks == before + 1


async def test_stats_namespaces_and_scan(store):
    other = Namespace("t", "other")
    await store.put(NS, [BlockIn(NS.storage_key(b"k%02d" % i), b"v" * i, i, checksum(b"v" * i)) for i in range(1, 6)], "disk")
    await store.put(other, [BlockIn(other.storage_key(b"x"), b"xyz", 3, checksum(b"xyz"))], "memory")
    stats = store.stats()
    assert stats.memory.blocks == 6 and stats.memory.bytes == 15 + 3
    assert stats.memory.capacity_bytes == 8 << 20 and stats.disk.capacity_bytes > 0
    assert (stats.disk.blocks, stats.disk.bytes) == (5, 15)  # "memory" puts reach disk later
    assert stats.namespaces == 1 and stats.evictions == 0 and stats.arena_used_bytes > 0
    assert store.namespaces() == [NS]

    page, more = await store.scan(NS, b"", 3)
    assert page == [(NS.storage_key(b"k%02d" % i), i) for i in range(1, 4)] and more
    page, more = await store.scan(NS, page[-1][0], 3)
    assert page == [(NS.storage_key(b"k%02d" % i), i) for i in range(4, 6)] and not more

    await store.flush()
    assert sorted(map(str, store.namespaces())) == sorted([str(NS), str(other)])
    assert store.stats().disk.blocks == 6


def test_the_arena_buffer_is_one_writable_buffer(tmp_path):
    async def scenario():
        made = BlockStore(tmp_path, memory_bytes=1 << 20, segment_size=1 << 20, sync_window=0, io_threads=1)
        try:
            buffer = made.arena_buffer()
            return len(buffer), buffer.readonly
        finally:
            await made.close()

    assert asyncio.run(scenario()) == (1 << 20, False)
