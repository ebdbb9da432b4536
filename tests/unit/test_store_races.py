"""BlockStore under concurrent deletes: a delete must hide exactly the keys it
deleted, never a block that another read was loading from disk meanwhile."""

from __future__ import annotations

import asyncio

from kvstore.checksum import checksum
from kvstore.namespace import Namespace
from kvstore.server.storage.store import BlockIn, BlockStore


def block(ns: Namespace, key: bytes, value: bytes) -> BlockIn:
    return BlockIn(ns.storage_key(key), value, len(value), checksum(value))


async def _read_while_deleting(tmp_path, victim: bytes) -> tuple[list, bytes]:
    store = BlockStore(tmp_path, memory_bytes=8 << 20, segment_size=1 << 20, sync_window=0, io_threads=2)
    ns = Namespace("t", "s")
    try:
        values = {b"wanted": b"w" * 5000, b"other": b"o" * 3000}
        await store.put(ns, [block(ns, k, v) for k, v in values.items()], "disk")
        for key in values:  # only on disk now: a get must load it into the arena
            store.memory.remove(ns.storage_key(key))
        loop = asyncio.get_running_loop()
        read = store.disk.read

        def read_then_delete(key):
            found = read(key)
            # Another request deletes a key while this read is in flight.
            asyncio.run_coroutine_threadsafe(store.delete([ns.storage_key(victim)]), loop).result()
            return found

        store.disk.read = read_then_delete
        copied = bytearray(8192)

        class Transfer:  # storage's Transfer interface, the client's slot being ``copied``
            checksums_while_copying = False

            async def write_from_arena(self, offsets, addresses, lengths):
                for offset, address, length in zip(offsets, addresses, lengths):
                    copied[address : address + length] = store.memory.arena.view(offset, length)

        results = await store.get_remote([ns.storage_key(b"wanted")], [8192], [0], Transfer())
        store.disk.read = read
        return results, bytes(copied[:5000])
    finally:
        await store.close()


def test_a_delete_of_another_key_during_a_disk_read_is_not_a_miss(tmp_path):
    results, copied = asyncio.run(_read_while_deleting(tmp_path, b"other"))
    assert results == [(5000, checksum(b"w" * 5000), True)]
    assert copied == b"w" * 5000


def test_a_delete_of_the_same_key_during_a_disk_read_wins(tmp_path):
    results, _ = asyncio.run(_read_while_deleting(tmp_path, b"wanted"))
    assert results == [None]
