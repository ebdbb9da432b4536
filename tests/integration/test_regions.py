"""put_from / get_into with registered regions, on every transport the machine has."""

import os

import numpy as np
import pytest

from kvstore.client import Client, SyncClient
from kvstore.errors import InvalidArgumentError


def native_available() -> bool:
    try:
        from kvstore import _native
    except ImportError:
        return False
    return _native.available()


TRANSPORTS = ["inline"] + (["ucx"] if native_available() else [])


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


async def test_numpy_and_bytearray_regions(daemon, tenant, transport):
    src = np.random.default_rng(1).integers(0, 255, size=4 << 20, dtype=np.uint8)
    dst = bytearray(4 << 20)
    async with Client(daemon.address, tenant=tenant, transport=transport) as kv:
        assert kv.zero_copy == (transport == "ucx")
        with kv.register(src) as source, kv.register(dst) as target:
            keys = [b"blk%d" % i for i in range(4)]
            offsets = [0, 1 << 20, 2 << 20, 3 << 20]
            sizes = [1, 1000, 1 << 20, 12345]
            assert await kv.put_from(keys, source, offsets, sizes) == 4
            got = await kv.get_into(keys + [b"missing"], target, offsets + [0], [1 << 20] * 5)
            assert got == sizes + [None]
            for off, size in zip(offsets, sizes):
                assert dst[off : off + size] == src[off : off + size].tobytes()
            # The plain API sees the same blocks.
            assert await kv.get(b"blk1") == src[1 << 20 : (1 << 20) + 1000].tobytes()


async def test_a_64_mib_block(daemon, tenant, transport):
    size = 64 << 20
    src = bytearray(os.urandom(size))
    dst = bytearray(size)
    async with Client(daemon.address, tenant=tenant, transport=transport) as kv:
        src_region, dst_region = kv.register(src), kv.register(dst)
        await kv.put_from([b"big"], src_region, [0], [size])
        assert await kv.get_into([b"big"], dst_region, [0], [size]) == [size]
        assert dst == src
        src_region.close()
        dst_region.close()


async def test_batches_of_a_thousand_keys(daemon, tenant, transport):
    n, size = 1000, 4096
    src = np.frombuffer(os.urandom(n * size), dtype=np.uint8).copy()
    dst = np.zeros(n * size, dtype=np.uint8)
    keys = [b"k%04d" % i for i in range(n)]
    offsets = [i * size for i in range(n)]
    async with Client(daemon.address, tenant=tenant, transport=transport, max_batch_keys=256) as kv:
        with kv.register(src) as source, kv.register(dst) as target:
            assert await kv.put_from(keys, source, offsets, [size] * n) == n
            assert await kv.get_into(keys, target, offsets, [size] * n) == [size] * n
    assert np.array_equal(src, dst)


async def test_plain_put_and_get_over_the_transport(daemon, tenant, transport):
    values = [(b"p%d" % i, os.urandom(s)) for i, s in enumerate([1, 100, 70_000, 3 << 20, 200_000])]
    async with Client(daemon.address, tenant=tenant, transport=transport) as kv:
        await kv.put_many(values)
        assert await kv.get_many([k for k, _ in values] + [b"none"]) == [v for _, v in values] + [None]


async def test_errors(daemon, tenant, transport):
    async with Client(daemon.address, tenant=tenant, transport=transport) as kv:
        with pytest.raises(InvalidArgumentError, match="writable"):
            kv.register(b"read-only bytes")
        buf = bytearray(1024)
        region = kv.register(buf)
        with pytest.raises(InvalidArgumentError, match="outside the region") as err:
            await kv.put_from([b"a", b"b"], region, [0, 1000], [10, 100])
        assert err.value.index == 1
        with pytest.raises(InvalidArgumentError, match="one of each"):
            await kv.put_from([b"a"], region, [0, 1], [1])
        buf[:100] = os.urandom(100)
        await kv.put_from([b"a"], region, [0], [100])
        with pytest.raises(InvalidArgumentError) as err:
            await kv.get_into([b"a"], region, [0], [50])
        assert err.value.code == "BUFFER_TOO_SMALL" and err.value.index == 0
        region.close()
        with pytest.raises(InvalidArgumentError, match="closed"):
            await kv.put_from([b"a"], region, [0], [1])


def test_sync_client_regions(daemon, tenant, transport):
    src = bytearray(os.urandom(10_000))
    dst = bytearray(10_000)
    with SyncClient(daemon.address, tenant=tenant, transport=transport) as kv:
        with kv.register(src) as a, kv.register(dst) as b:
            kv.put_from([b"x", b"y"], a, [0, 5000], [5000, 5000])
            assert kv.get_into([b"y", b"x"], b, [0, 5000], [5000, 5000]) == [5000, 5000]
    assert dst == src[5000:] + src[:5000]


async def test_blocks_larger_than_the_daemon_can_stage_go_inline(tmp_path, tenant, transport):
    from tests.conftest import ThreadedDaemon

    small = ThreadedDaemon(tmp_path, memory=4 << 20)  # stages blocks up to 2 MiB
    try:
        src = bytearray(os.urandom(3 << 20))
        dst = bytearray(3 << 20)
        async with Client(small.address, tenant=tenant, transport=transport) as kv:
            with kv.register(src) as a, kv.register(dst) as b:
                assert await kv.put_from([b"big", b"small"], a, [0, 0], [3 << 20, 1000]) == 2
                assert await kv.get_into([b"big"], b, [0], [3 << 20]) == [3 << 20]
                assert dst == src
                await kv.put(b"plain", bytes(src))
                assert await kv.get(b"plain") == bytes(src)
    finally:
        small.stop()
