"""Every SDK method against a real in-process daemon."""

import asyncio
import os
import random
import threading

import numpy as np
import pytest

from kvstore.client import Client, ClientConfig, SyncClient
from kvstore.errors import InvalidArgumentError
from tests.conftest import ThreadedDaemon

SIZES = [1, 2, 1000, 4096, 65536, 1 << 20, (1 << 20) + 7, 16 << 20, 64 << 20]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
async def test_round_trip_sizes(daemon, tenant, size):
    value = os.urandom(size)
    async with Client(daemon.address, tenant=tenant) as kv:
        await kv.put(b"block", value)
        got = await kv.get(b"block")
    assert got == value


async def test_bytes_like_values(daemon, tenant):
    array = np.arange(1000, dtype=np.float32)
    async with Client(daemon.address, tenant=tenant) as kv:
        await kv.put(b"np", array)
        await kv.put(b"ba", bytearray(b"abc"))
        await kv.put(b"mv", memoryview(b"xyz"))
        assert await kv.get(b"np") == array.tobytes()
        assert await kv.get_many([b"ba", b"mv"]) == [b"abc", b"xyz"]
        with pytest.raises(InvalidArgumentError):
            await kv.put(b"s", "text is not bytes")
        with pytest.raises(InvalidArgumentError):
            await kv.put(b"n", 12345)


async def test_batches_of_a_thousand(daemon, tenant):
    items = [(b"key-%04d" % i, os.urandom(random.randint(1, 4096))) for i in range(1000)]
    async with Client(daemon.address, tenant=tenant, max_batch_keys=300) as kv:
        assert await kv.put_many(items) == 1000
        keys = [k for k, _ in items]
        assert await kv.get_many(keys) == [v for _, v in items]
        assert await kv.exists(keys + [b"absent"]) == [True] * 1000 + [False]
        assert await kv.lookup_prefix(keys) == 1000
        stat = await kv.stat()
        assert (stat["blocks"], stat["bytes"]) == (1000, sum(len(v) for _, v in items))
        assert await kv.delete(keys[:500] + [b"absent"]) == 500
        assert await kv.exists(keys[499:501]) == [False, True]


async def test_put_many_accepts_a_mapping(daemon, tenant):
    async with Client(daemon.address, tenant=tenant) as kv:
        assert await kv.put_many({b"a": b"1", b"b": b"2"}) == 2
        assert await kv.get_many([b"b", b"a", b"c"]) == [b"2", b"1", None]


async def test_lookup_prefix_semantics(daemon, tenant):
    async with Client(daemon.address, tenant=tenant, max_batch_keys=4) as kv:
        await kv.put_many([(b"p%d" % i, b"v") for i in range(10)])
        keys = [b"p%d" % i for i in range(10)]
        assert await kv.lookup_prefix(keys) == 10
        assert await kv.lookup_prefix(keys[:6] + [b"gap"] + keys[6:]) == 6  # stops at the first gap
        assert await kv.lookup_prefix([b"gap"] + keys) == 0
        assert await kv.lookup_prefix([]) == 0
        await kv.delete([b"p5"])
        assert await kv.lookup_prefix(keys) == 5


async def test_a_cluster_of_one_counts_a_prefix_on_the_daemon(daemon, tenant):
    """Against a cluster of one, lookup_prefix is one LookupPrefix call per chunk
    (the daemon counts; one integer comes back), not an Exists with a flag per key."""

    def calls(method: str) -> float:
        return daemon.daemon.metrics.registry.get_sample_value(
            "kvstore_requests_total", {"method": f"Data.{method}", "code": "OK"}
        ) or 0.0

    async with Client(daemon.address, tenant=tenant, max_batch_keys=4) as kv:
        await kv.put_many([(b"q%d" % i, b"v") for i in range(10)])
        lookups, exists = calls("LookupPrefix"), calls("Exists")
        assert await kv.lookup_prefix([b"q%d" % i for i in range(10)]) == 10
        assert calls("LookupPrefix") - lookups == 3 and calls("Exists") == exists  # chunks of 4, 4 and 2
        assert await kv.lookup_prefix([b"q0", b"q1", b"gap", b"q3", b"q4", b"q5"]) == 2
        assert calls("LookupPrefix") - lookups == 4  # the first chunk ends at the gap: no second call


async def test_miss_is_none_and_overwrite_wins(daemon, tenant):
    async with Client(daemon.address, tenant=tenant) as kv:
        assert await kv.get(b"never") is None
        await kv.put(b"k", b"first")
        await kv.put(b"k", b"second value")
        assert await kv.get(b"k") == b"second value"
        assert (await kv.stat())["blocks"] == 1
        assert await kv.delete([b"k", b"k"]) == 1
        assert await kv.get(b"k") is None


@pytest.mark.parametrize("durability", ["memory", "disk", "sync"])
async def test_durability_levels(daemon, tenant, durability):
    async with Client(daemon.address, tenant=tenant) as kv:
        values = [(b"d%d" % i, os.urandom(10_000)) for i in range(20)]
        await kv.put_many(values, durability=durability)
        assert await kv.get_many([k for k, _ in values]) == [v for _, v in values]
    with pytest.raises(InvalidArgumentError) as err:
        async with Client(daemon.address, tenant=tenant) as kv:
            await kv.put(b"x", b"y", durability="fast")
    assert err.value.code == "UNKNOWN_DURABILITY"


async def test_list_pages_through_keys(daemon, tenant):
    async with Client(daemon.address, tenant=tenant) as kv:
        await kv.put_many([(b"a/%05d" % i, b"x" * (i % 7 + 1)) for i in range(2500)])
        await kv.put(b"b/other", b"y")
        listed = await kv.list(b"a/")
        assert [k for k, _ in listed] == [b"a/%05d" % i for i in range(2500)]
        assert [n for _, n in listed] == [i % 7 + 1 for i in range(2500)]
        assert await kv.list(b"b/") == [(b"b/other", 1)]
        assert len(await kv.list(limit=10)) == 10
        assert len(await kv.list()) == 2501


def test_sync_client_from_many_threads(daemon, tenant):
    errors = []
    with SyncClient(daemon.address, tenant=tenant) as kv:

        def worker(n: int) -> None:
            try:
                for i in range(50):
                    key, value = b"t%d-%d" % (n, i), os.urandom(1000 + i)
                    kv.put(key, value)
                    assert kv.get(key) == value
                    assert kv.exists([key]) == [True]
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert kv.stat()["blocks"] == 400
        assert kv.lookup_prefix([b"t0-0", b"t0-1", b"nope"]) == 2
        assert kv.delete([b"t0-0"]) == 1
        assert len(kv.list(b"t1-")) == 50


async def test_client_accepts_endpoint_lists(daemon, tenant):
    # A dead endpoint first: the client fails over to the live one.
    dead = "127.0.0.1:1"
    for endpoints in (f"{dead},{daemon.address}", [dead, daemon.address]):
        async with Client(endpoints, tenant=tenant, connect_timeout=1) as kv:
            await kv.put(b"k", b"v")
            assert await kv.get(b"k") == b"v"


async def test_memory_tier_spills_to_disk(tmp_path, tenant):
    """More data than the arena holds: older blocks are evicted and read back from disk."""
    daemon = ThreadedDaemon(tmp_path, memory=8 << 20)
    try:
        values = [(b"e%d" % i, os.urandom(1 << 20)) for i in range(24)]
        async with Client(daemon.address, tenant=tenant) as kv:
            await kv.put_many(values)
            assert await kv.get_many([k for k, _ in values]) == [v for _, v in values]
            stats = await kv.server_stats()
        assert stats["evictions"] > 0
        assert stats["tiers"]["memory"]["bytes"] <= 8 << 20
        assert stats["tiers"]["disk"]["blocks"] == 24
    finally:
        daemon.stop()


async def test_memory_durability_when_the_arena_is_full_writes_through(tmp_path, tenant):
    daemon = ThreadedDaemon(tmp_path, memory=4 << 20)
    try:
        values = [(b"m%d" % i, os.urandom(1 << 20)) for i in range(12)]
        async with Client(daemon.address, tenant=tenant) as kv:
            await kv.put_many(values, durability="memory")
            assert await kv.get_many([k for k, _ in values]) == [v for _, v in values]
    finally:
        daemon.stop()


async def test_large_gets_are_split_into_bounded_responses(tmp_path, tenant):
    daemon = ThreadedDaemon(tmp_path, memory=64 << 20, max_response_bytes=1 << 20)
    try:
        values = [(b"r%d" % i, os.urandom(300_000)) for i in range(40)]
        async with Client(daemon.address, tenant=tenant) as kv:
            await kv.put_many(values)
            got = await kv.get_many([k for k, _ in values] + [b"missing"])
        assert got == [v for _, v in values] + [None]
        gets = daemon.daemon.metrics.requests.labels("Data.Get", "OK")._value.get()
        assert gets >= 10  # 12 MB of values in responses of at most ~1 MB
    finally:
        daemon.stop()


async def test_concurrent_clients(daemon, tenant):
    async def one(n):
        async with Client(daemon.address, tenant=tenant, subtenant=f"s{n}") as kv:
            values = [(b"k%d" % i, os.urandom(5000)) for i in range(100)]
            await kv.put_many(values)
            assert await kv.get_many([k for k, _ in values]) == [v for _, v in values]

    await asyncio.gather(*(one(n) for n in range(6)))


async def test_namespaces_and_drop(daemon, tenant):
    async with Client(daemon.address, tenant=tenant, subtenant="a") as a, Client(
        daemon.address, tenant=tenant, subtenant="b"
    ) as b:
        await a.put_many([(b"k%d" % i, b"x" * 10) for i in range(100)])
        await b.put(b"k0", b"b-value")
        listed = {(n["subtenant"], n["blocks"]) for n in await a.namespaces(tenant)}
        assert listed == {("a", 100), ("b", 1)}
        assert await a.drop_namespace() == {"blocks": 100, "bytes": 1000}
        assert await a.get(b"k0") is None and await a.list() == []
        assert await b.get(b"k0") == b"b-value"


def test_config_object_and_environment(daemon, tenant, monkeypatch):
    monkeypatch.setenv("KVSTORE_ENDPOINTS", daemon.address)
    monkeypatch.setenv("KVSTORE_TENANT", tenant)
    with SyncClient() as kv:
        assert kv.config.endpoints == (daemon.address,)
        kv.put(b"env", b"ok")
    with SyncClient(config=ClientConfig(endpoints=daemon.address, tenant=tenant)) as kv:
        assert kv.get(b"env") == b"ok"
