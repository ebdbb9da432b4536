"""Deferred write-back of "memory" puts (server/storage/writeback.py) on a real
BlockStore: it waits while puts stream in, and writes when they pause, when the
oldest block is ``delay`` old, when the queue passes its high-water mark, when a
put needs arena room, and on flush; deleted or overwritten blocks are never
written; the bytes on disk are the bytes put."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.checksum import checksum
from kvstore.namespace import Namespace
from kvstore.server.storage.store import BlockIn, BlockStore
from tests.conftest import wait_for

NS = Namespace("t", "s")


def block(key: bytes, value: bytes) -> BlockIn:
    return BlockIn(NS.storage_key(key), value, len(value), checksum(value))


def on_disk(store: BlockStore, key: bytes) -> bytes | None:
    found = store.disk.read(NS.storage_key(key))
    return None if found is None else bytes(found[0])


@pytest.fixture
async def stores(tmp_path):
    """Makes BlockStores on tmp_path (one after the other: a reopened one sees the same data);
    every one still open is closed at the end."""
    made: list[BlockStore] = []

    def make(*, memory=8 << 20, delay=1.0, idle=None) -> BlockStore:
        store = BlockStore(
            tmp_path, memory_bytes=memory, segment_size=1 << 20, sync_window=0, io_threads=2, writeback_delay=delay
        )
        if idle is not None:
            store.writeback.idle = idle
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


async def test_a_stream_of_puts_is_written_back_when_it_pauses(stores):
    store = stores(delay=30, idle=0.5)
    values = {b"k%d" % i: bytes([i]) * 1000 for i in range(10)}
    for key, value in values.items():
        await store.put(NS, [block(key, value)], "memory")
        await asyncio.sleep(0.01)  # well under the idle time: still a stream
    assert store.writeback.batches == 0 and store.memory.dirty_bytes == 10_000
    assert all(on_disk(store, key) is None for key in values)
    waited = await wait_for(lambda: store.memory.dirty_bytes == 0)
    assert 0.2 < waited < 5  # the pause, not the 30 s bound
    assert store.writeback.batches == 1  # the whole burst in one batch
    assert {key: on_disk(store, key) for key in values} == values


async def test_the_oldest_block_waits_at_most_the_delay(stores):
    store = stores(delay=0.3, idle=30)
    await store.put(NS, [block(b"a", b"x" * 100)], "memory")
    assert on_disk(store, b"a") is None
    waited = await wait_for(lambda: on_disk(store, b"a") is not None)
    assert 0.1 < waited < 5
    assert on_disk(store, b"a") == b"x" * 100


async def test_delay_zero_writes_each_put_back_at_once(stores):
    store = stores(delay=0)
    await store.put(NS, [block(b"a", b"y" * 10)], "memory")
    await wait_for(lambda: on_disk(store, b"a") == b"y" * 10, timeout=2)


async def test_the_high_water_mark_starts_a_write_back_mid_stream(stores):
    store = stores(memory=8 << 20, delay=30, idle=30)  # high water: 2 MiB
    await store.put(NS, [block(b"a", b"1" * (1 << 20))], "memory")
    await asyncio.sleep(0.05)
    assert store.writeback.batches == 0
    await store.put(NS, [block(b"b", b"2" * (1 << 20))], "memory")
    await wait_for(lambda: store.memory.dirty_bytes == 0)
    assert on_disk(store, b"a") == b"1" * (1 << 20) and on_disk(store, b"b") == b"2" * (1 << 20)


async def test_a_put_that_needs_room_gets_it_from_queued_blocks(stores):
    # 8 MiB arena, 3 MiB blocks: the third fits only once a dirty one is written back and evicted.
    store = stores(memory=8 << 20, delay=30, idle=30)
    store.writeback.high_water = 1 << 40
    store.reserve_timeout = 5
    values = {b"k%d" % i: bytes([65 + i]) * (3 << 20) for i in range(3)}
    for key, value in values.items():
        blocks = [block(key, value)]

        class Transfer:  # storage's Transfer interface, with the client's bytes in ``value``
            checksums_while_copying = False

            async def read_into_arena(self, offsets, addresses, sizes, value=value):
                for offset, size in zip(offsets, sizes):
                    store.memory.arena.view(offset, size)[:] = value
                return None

        await asyncio.wait_for(store.put_remote(NS, blocks, "memory", Transfer(), [0]), 4)
    assert store.writeback.batches >= 1
    await store.flush()
    assert {key: on_disk(store, key) for key in values} == values


async def test_flush_writes_everything_queued_now(stores):
    store = stores(delay=30, idle=30)
    await store.put(NS, [block(b"k%d" % i, b"v%d" % i) for i in range(5)], "memory")
    await asyncio.wait_for(store.flush(), 5)
    assert store.memory.dirty_bytes == 0
    assert [on_disk(store, b"k%d" % i) for i in range(5)] == [b"v%d" % i for i in range(5)]


async def test_deleted_or_overwritten_while_queued_is_never_written(stores):
    store = stores(delay=30, idle=30)
    await store.put(NS, [block(b"gone", b"old"), block(b"kept", b"first")], "memory")
    assert await store.delete([NS.storage_key(b"gone")]) == 1
    await store.put(NS, [block(b"kept", b"second")], "memory")
    await store.flush()
    assert on_disk(store, b"gone") is None
    assert on_disk(store, b"kept") == b"second"
    assert store.disk.totals()[0] == 1


async def test_close_writes_back_what_is_queued(stores):
    store = stores(delay=30, idle=30)
    await store.put(NS, [block(b"a", b"z" * 4096)], "memory")
    await store.close()
    reopened = stores()
    assert on_disk(reopened, b"a") == b"z" * 4096


def test_a_negative_delay_is_a_config_error():
    from kvstore.errors import ConfigError
    from kvstore.server.config import ServerConfig

    with pytest.raises(ConfigError, match="writeback_delay: must not be negative"):
        ServerConfig(writeback_delay=-1.0)
    assert ServerConfig(writeback_delay=0).writeback_delay == 0
