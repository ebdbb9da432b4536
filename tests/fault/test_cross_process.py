"""The zero-copy data plane between separate processes: a kvstore-server
subprocess and this process as its client, over shared memory ("shm,tcp" on
both sides) and over TCP only ("tcp"). numpy and bytearray buffers registered
with ``Client.register``, and memory from ``Client.allocate``, are moved by
put_from/get_into byte-exact from 1 byte to 64 MiB, in batches of 1 000 keys,
with misses answered as such."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvstore.client import Client

try:
    from kvstore import _native

    NATIVE = _native.available()
except ImportError:
    NATIVE = False

pytestmark = pytest.mark.skipif(not NATIVE, reason="the native data plane is not built")

SIZES = [1, 17, 4095, 4096, 4097, (1 << 20) - 1, 1 << 20, 3_333_333, 64 << 20]


@pytest.fixture(params=["shm,tcp", "tcp"], scope="module")
def tls(request):
    return request.param


@pytest.fixture
def served(daemon_process, tls):
    proc = daemon_process("--memory", "512MiB", "--ucx-tls", tls).start()
    return proc.address, tls


async def _connected(address: str, tls: str, tenant: str, **settings) -> Client:
    kv = Client(address, tenant=tenant, transport="ucx", ucx_tls=tls, **settings)
    await kv.connect()
    assert kv.zero_copy, "the client has no zero-copy path to the daemon"
    stats = await kv.server_stats()
    assert stats["data_plane"]["enabled"] and stats["data_plane"]["ucx_tls"] == tls
    return kv


@pytest.mark.parametrize("kind", ["numpy", "bytearray"])
async def test_every_size_byte_exact_and_misses(served, kind):
    address, tls = served
    total = sum(SIZES)
    rng = np.random.default_rng(len(tls))
    data = rng.integers(0, 256, size=total, dtype=np.uint8)
    if kind == "numpy":
        src, dst = data, np.zeros(total, dtype=np.uint8)
    else:
        src, dst = bytearray(data.tobytes()), bytearray(total)
    offsets = np.cumsum([0] + SIZES[:-1]).tolist()
    keys = [b"%s/size-%d" % (kind.encode(), n) for n in SIZES]
    kv = await _connected(address, tls, f"x-{kind}")
    try:
        with kv.register(src) as source, kv.register(dst) as target:
            assert await kv.put_from(keys, source, offsets, SIZES) == len(SIZES)
            got = await kv.get_into(keys + [b"never-put"], target, offsets + [0], SIZES + [16])
            assert got == SIZES + [None]
        assert bytes(dst) == bytes(src)
        # Each key holds exactly its own bytes, read back through the plain API too.
        assert await kv.get(keys[2]) == bytes(src[offsets[2] : offsets[2] + SIZES[2]])
    finally:
        await kv.close()


async def test_batches_of_a_thousand_keys(served):
    address, tls = served
    n, size = 1000, 4096
    src = np.frombuffer(os.urandom(n * size), dtype=np.uint8).copy()
    dst = np.zeros(n * size, dtype=np.uint8)
    keys = [b"batch/%04d" % i for i in range(n)]
    offsets = [i * size for i in range(n)]
    kv = await _connected(address, tls, "x-batch")
    try:
        with kv.register(src) as source, kv.register(dst) as target:
            assert await kv.put_from(keys, source, offsets, [size] * n) == n
            # Every other key is missing: the answers line up with the keys asked.
            asked = [k if i % 2 == 0 else k + b"-missing" for i, k in enumerate(keys)]
            got = await kv.get_into(asked, target, offsets, [size] * n)
            assert got == [size if i % 2 == 0 else None for i in range(n)]
            for i in range(0, n, 2):
                assert np.array_equal(dst[i * size : (i + 1) * size], src[i * size : (i + 1) * size])
            assert not dst[size : 2 * size].any()  # a miss writes nothing
    finally:
        await kv.close()


async def test_allocated_memory(served):
    """``Client.allocate``: the daemon maps it when it may (shared memory), else reads it by RMA."""
    address, tls = served
    kv = await _connected(address, tls, "x-alloc")
    try:
        size = 8 << 20
        with kv.allocate(2 * size) as region:
            assert (region.shared is not None) == (tls == "shm,tcp")
            payload = os.urandom(size)
            region.buffer[:size] = payload
            assert await kv.put_from([b"a"], region, [0], [size]) == 1
            assert await kv.get_into([b"a", b"none"], region, [size, 0], [size, size]) == [size, None]
            assert bytes(region.buffer[size:]) == payload
            assert bytes(region.buffer[:size]) == payload  # the miss left the first half alone
    finally:
        await kv.close()
