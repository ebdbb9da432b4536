"""Memory a co-located client registered itself (numpy, bytearray, a raw
range): the daemon copies the blocks between the client's process and its
arena itself (process_vm_readv/writev, ProcessMemoryTransfer), hashing them
as it copies, so the client neither hashes a put nor verifies a get; only for
the process at the other end of the local channel, only inside the region the
request names, and by RMA where the kernel refuses."""

from __future__ import annotations

import ctypes
import errno
import sys

import numpy as np
import pytest

from kvstore import errors
from kvstore.client import Client
from kvstore.client.regions import MemoryRegion

try:
    from kvstore import _native

    NATIVE = _native.available() and sys.platform.startswith("linux")
except ImportError:
    NATIVE = False

pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(not NATIVE, reason="no native data plane or not Linux")]


class Spy:
    """Counts the daemon's process copies and RMA transfers, and the client's own hashing."""

    def __init__(self, daemon, monkeypatch) -> None:
        self.reads = self.writes = self.rma = self.client_hashes = 0
        plane = daemon.daemon.dataplane
        copy, transfer = plane._process_copy, plane._transfer

        async def process_copy(read, *args):
            if read:
                self.reads += 1
            else:
                self.writes += 1
            return await copy(read, *args)

        async def rma(*args):
            self.rma += 1
            return await transfer(*args)

        monkeypatch.setattr(plane, "_process_copy", process_copy)
        monkeypatch.setattr(plane, "_transfer", rma)
        checksum = MemoryRegion.checksum

        def counted(region, offset, size):
            self.client_hashes += 1
            return checksum(region, offset, size)

        monkeypatch.setattr(MemoryRegion, "checksum", counted)


def random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


async def warm(kv) -> None:
    """One call opens the local channel (and learns the daemon copies our memory)."""
    await kv.exists([b"-"])


@pytest.mark.parametrize("kind", ["numpy", "bytearray", "ptr"])
async def test_registered_memory_moves_byte_exact_through_the_process_copy(fresh_daemon, tenant, monkeypatch, kind):
    sizes = [1, 4095, 4097, (256 << 10) + 3, 1 << 20, 5 << 20]
    offsets = np.cumsum([3] + sizes[:-1]).tolist()
    total = offsets[-1] + sizes[-1] + 64
    data = random_bytes(total, 1)
    keep = []
    async with Client(fresh_daemon.address, tenant=tenant, transport="ucx") as kv:
        await warm(kv)
        assert kv._nodes.copies_process(fresh_daemon.address)
        spy = Spy(fresh_daemon, monkeypatch)

        def register(initial: np.ndarray | None):
            if kind == "numpy":
                array = initial.copy() if initial is not None else np.zeros(total, dtype=np.uint8)
                keep.append(array)
                return kv.register(array)
            if kind == "bytearray":
                buffer = bytearray(initial.tobytes()) if initial is not None else bytearray(total)
                keep.append(buffer)
                return kv.register(buffer)
            raw = (ctypes.c_uint8 * total)()
            if initial is not None:
                ctypes.memmove(raw, initial.ctypes.data, total)
            keep.append(raw)
            return kv.register_ptr(ctypes.addressof(raw), total)

        src, dst = register(data), register(None)
        keys = [b"k%d" % n for n in sizes]
        assert await kv.put_from(keys, src, offsets, sizes, durability="memory") == len(sizes)
        assert await kv.put_from([b"d"], src, [0], [1 << 20], durability="disk") == 1
        got = await kv.get_into(keys + [b"missing"], dst, offsets + [0], sizes + [10])
        assert got == sizes + [None]
        out = np.frombuffer(dst.buffer, dtype=np.uint8)
        for offset, size in zip(offsets, sizes):
            assert np.array_equal(out[offset : offset + size], data[offset : offset + size]), size
        assert await kv.get_into([b"d"], dst, [0], [1 << 20]) == [1 << 20]
        assert np.array_equal(out[: 1 << 20], data[: 1 << 20])
        del out
        assert (spy.reads, spy.writes, spy.rma) == (2, 2, 0)
        assert spy.client_hashes == 0  # the daemon hashed every put and verified every get
        src.close()
        dst.close()


async def test_plain_puts_and_gets_are_unchanged(fresh_daemon, tenant):
    async with Client(fresh_daemon.address, tenant=tenant, transport="ucx") as kv:
        values = [(b"p%d" % i, bytes(random_bytes(n, i))) for i, n in enumerate([1, 70_000, 3 << 20])]
        await kv.put_many(values)
        assert await kv.get_many([k for k, _ in values]) == [v for _, v in values]


async def test_a_request_naming_another_process_is_moved_by_rma(fresh_daemon, tenant, monkeypatch):
    wire = MemoryRegion.wire

    def another_pid(region):
        message = wire(region)
        message.pid = 1  # not the process at the other end of the socket
        return message

    async with Client(fresh_daemon.address, tenant=tenant, transport="ucx") as kv:
        await warm(kv)
        spy = Spy(fresh_daemon, monkeypatch)
        monkeypatch.setattr(MemoryRegion, "wire", another_pid)
        data = random_bytes(1 << 20, 2)
        out = np.zeros(1 << 20, dtype=np.uint8)
        with kv.register(data) as src, kv.register(out) as dst:
            assert await kv.put_from([b"a"], src, [0], [1 << 20]) == 1
            # Refused once (the checksums were left to the daemon), then sent with them by RMA.
            assert fresh_daemon.address in kv._nodes.process_copy_refused
            assert await kv.get_into([b"a"], dst, [0], [1 << 20]) == [1 << 20]
            assert np.array_equal(out, data)
        assert spy.reads == spy.writes == 0 and spy.rma == 2
        assert spy.client_hashes == 2  # the client hashed the put and verified the get


async def test_a_block_outside_the_named_region_is_refused(fresh_daemon, tenant, monkeypatch):
    wire = MemoryRegion.wire

    def shorter(region):
        message = wire(region)
        message.length = 4096  # the request claims a smaller region than the block it names
        return message

    async with Client(fresh_daemon.address, tenant=tenant, transport="ucx") as kv:
        await warm(kv)
        spy = Spy(fresh_daemon, monkeypatch)
        monkeypatch.setattr(MemoryRegion, "wire", shorter)
        data = random_bytes(1 << 20, 3)
        with kv.register(data) as region:
            with pytest.raises(errors.InvalidArgumentError, match="outside the region"):
                await kv.put_from([b"o"], region, [8192], [100])
            assert await kv.put_from([b"i"], region, [0], [4096]) == 1
            with pytest.raises(errors.InvalidArgumentError, match="outside the region"):
                await kv.get_into([b"i"], region, [4000], [4096])
        assert spy.rma == 0
        assert await kv.get(b"o") is None


async def test_a_corrupt_stored_block_is_still_detected_on_get(fresh_daemon, tenant):
    async with Client(fresh_daemon.address, tenant=tenant, transport="ucx") as kv:
        await warm(kv)
        data = random_bytes(1 << 20, 4)
        with kv.register(data.copy()) as region:
            await kv.put_from([b"c"], region, [0], [1 << 20], durability="disk")
            entry = next(e for k, e in fresh_daemon.store.memory._index.items() if k.endswith(b"c"))
            fresh_daemon.store.memory.arena.buffer[entry.offset + 7] ^= 0xFF
            corrupt_before = fresh_daemon.store.disk.corrupt_blocks
            assert await kv.get_into([b"c"], region, [0], [1 << 20]) == [None]  # a miss, never bad bytes
            assert fresh_daemon.store.disk.corrupt_blocks == corrupt_before + 1
            assert await kv.get_into([b"c"], region, [0], [1 << 20]) == [1 << 20]  # from disk, intact
            assert np.array_equal(np.frombuffer(region.buffer, dtype=np.uint8), data)


async def test_a_kernel_that_refuses_the_copy_falls_back_to_rma(fresh_daemon, tenant, monkeypatch):
    async with Client(fresh_daemon.address, tenant=tenant, transport="ucx") as kv:
        await warm(kv)
        spy = Spy(fresh_daemon, monkeypatch)

        async def refused(read, pid, arena_offsets, addresses, sizes):
            spy.reads += 1
            return [], 0, errno.EPERM  # as under a stricter ptrace scope

        monkeypatch.setattr(fresh_daemon.daemon.dataplane, "_process_copy", refused)
        data = random_bytes(1 << 20, 5)
        out = np.zeros(1 << 20, dtype=np.uint8)
        with kv.register(data) as src, kv.register(out) as dst:
            assert await kv.put_from([b"e"], src, [0], [1 << 20]) == 1  # refused, resent with checksums, by RMA
            assert await kv.get_into([b"e"], dst, [0], [1 << 20]) == [1 << 20]
            assert np.array_equal(out, data)
        assert spy.reads == 1 and spy.rma == 2  # refused once: the session moves by RMA from then on
        assert spy.client_hashes == 2


async def test_memory_the_client_unmapped_fails_the_request_precisely(fresh_daemon, tenant, monkeypatch):
    async with Client(fresh_daemon.address, tenant=tenant, transport="ucx") as kv:
        await warm(kv)
        page = (ctypes.c_uint8 * 8192)()
        region = kv.register_ptr(ctypes.addressof(page), 8192)
        wire = MemoryRegion.wire

        def unmapped(r):
            message = wire(r)
            message.address, message.length = 1 << 12, 1 << 20  # claims memory this process has not mapped
            return message

        monkeypatch.setattr(MemoryRegion, "wire", unmapped)
        await kv.put(b"u", b"x" * 100)
        with pytest.raises(errors.KVStoreError):
            await kv.get_into([b"u"], region, [0], [100])
        assert await kv.get(b"u") == b"x" * 100  # the daemon keeps serving
        region.close()
