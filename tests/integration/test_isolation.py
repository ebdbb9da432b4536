"""Namespace isolation through every Data RPC.

Two namespaces, A and B, on one daemon, in several shapes: different tenants;
one tenant with two subtenants; and pairs whose names are prefixes of each
other or would collide if the storage encoding merely concatenated them. What
is written in A is invisible to B through Get, Exists, LookupPrefix, List,
Delete and Stat, and the same key in both holds two separate values.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore._proto.v1 import data_pb2 as pb
from kvstore._proto.v1 import data_pb2_grpc
from kvstore.checksum import checksum
from kvstore.client import Client, SyncClient


def _uid() -> str:
    return uuid.uuid4().hex[:10]


def _pairs():
    u = _uid()
    return {
        "tenants": (("A" + u, "default"), ("B" + u, "default")),
        "subtenants": (("T" + u, "one"), ("T" + u, "two")),
        "tenant-prefix": (("P" + u, "s"), ("P" + u + "x", "s")),
        "subtenant-prefix": (("S" + u, "s"), ("S" + u, "s1")),
        # Plain concatenation would make both "C<u>abc".
        "concat-collision": (("C" + u + "a", "bc"), ("C" + u + "ab", "c")),
    }


PAIR_IDS = list(_pairs())


@pytest.fixture(params=PAIR_IDS)
def pair(request):
    """Two fresh namespaces, (tenant, subtenant) each."""
    return _pairs()[request.param]


def clients(daemon, pair, **settings):
    (ta, sa), (tb, sb) = pair
    return Client(daemon.address, tenant=ta, subtenant=sa, **settings), Client(
        daemon.address, tenant=tb, subtenant=sb, **settings
    )


ITEMS = [
    (b"a", b"1"),
    (b"block-000", os.urandom(100)),
    (b"block-001", os.urandom(4096)),
    (b"block-002", os.urandom(70_000)),
    (b"\x00\xff binary", os.urandom(10)),
    (b"z" * 1024, os.urandom(333)),
]
KEYS = [k for k, _ in ITEMS]


@pytest.mark.parametrize("durability", ["disk", "memory"])
async def test_writes_in_a_are_invisible_in_b(daemon, pair, durability):
    a, b = clients(daemon, pair)
    async with a, b:
        assert await a.put_many(ITEMS, durability=durability) == len(ITEMS)
        # B sees nothing of A, through every read.
        assert await b.get_many(KEYS) == [None] * len(KEYS)
        assert await b.exists(KEYS) == [False] * len(KEYS)
        assert await b.lookup_prefix(KEYS) == 0
        assert await b.list() == []
        assert await b.list(b"block-") == []
        stat = await b.stat()
        assert (stat["blocks"], stat["bytes"]) == (0, 0)
        # A sees all of it, byte-exact.
        assert await a.get_many(KEYS) == [v for _, v in ITEMS]
        assert await a.exists(KEYS) == [True] * len(KEYS)
        assert await a.lookup_prefix(KEYS) == len(KEYS)
        assert await a.list() == sorted((k, len(v)) for k, v in ITEMS)
        assert await a.list(b"block-") == [(k, len(v)) for k, v in ITEMS if k.startswith(b"block-")]
        stat = await a.stat()
        assert (stat["blocks"], stat["bytes"]) == (len(ITEMS), sum(len(v) for _, v in ITEMS))


async def test_delete_in_b_does_not_touch_a(daemon, pair):
    a, b = clients(daemon, pair)
    async with a, b:
        await a.put_many(ITEMS)
        assert await b.delete(KEYS) == 0
        assert await b.delete([KEYS[0]]) == 0
        assert await a.get_many(KEYS) == [v for _, v in ITEMS]
        assert (await a.stat())["blocks"] == len(ITEMS)
        # Now both hold the key; deleting it in B removes B's copy only.
        await b.put(KEYS[0], b"b's copy")
        assert await b.delete([KEYS[0]]) == 1
        assert await b.get(KEYS[0]) is None
        assert await a.get(KEYS[0]) == ITEMS[0][1]
        # And the other way round.
        await b.put(KEYS[1], b"b keeps this")
        assert await a.delete(KEYS) == len(ITEMS)
        assert await a.get_many(KEYS) == [None] * len(KEYS)
        assert await b.get_many(KEYS[:2]) == [None, b"b keeps this"]
        assert (await b.stat())["blocks"] == 1
        assert (await a.stat())["blocks"] == 0


async def test_same_key_in_both_keeps_two_values(daemon, pair):
    a, b = clients(daemon, pair)
    async with a, b:
        va = {k: os.urandom(len(v) + 1) for k, v in ITEMS}
        vb = {k: os.urandom(len(v) + 2) for k, v in ITEMS}
        await a.put_many(va.items())
        await b.put_many(vb.items())
        assert await a.get_many(KEYS) == [va[k] for k in KEYS]
        assert await b.get_many(KEYS) == [vb[k] for k in KEYS]
        assert await a.list() == sorted((k, len(v)) for k, v in va.items())
        assert await b.list() == sorted((k, len(v)) for k, v in vb.items())
        # Overwriting in A leaves B's value alone.
        await a.put(KEYS[2], b"new in A", durability="memory")
        assert await a.get(KEYS[2]) == b"new in A"
        assert await b.get(KEYS[2]) == vb[KEYS[2]]


async def test_stat_counts_only_own_blocks(daemon, pair):
    a, b = clients(daemon, pair)
    async with a, b:
        await a.put_many([(b"x", b"0" * 10), (b"y", b"0" * 100), (b"z", b"0" * 1000)])
        await b.put_many([(b"x", b"1" * 7), (b"w", b"1" * 70_000)])
        await a.put(b"y", b"0" * 50)  # an overwrite changes A's bytes, not its count
        sa, sb = await a.stat(), await b.stat()
        assert (sa["tenant"], sa["subtenant"]) == pair[0]
        assert (sb["tenant"], sb["subtenant"]) == pair[1]
        assert (sa["blocks"], sa["bytes"]) == (3, 1060)
        assert (sb["blocks"], sb["bytes"]) == (2, 70_007)
        await b.delete([b"x", b"y", b"z"])  # only x exists in B
        assert ((await a.stat())["blocks"], (await b.stat())["blocks"]) == (3, 1)


@pytest.mark.parametrize("stage", ["before-disk-write", "after-disk-write"])
async def test_stat_is_exact_while_a_memory_block_is_written_back(fresh_daemon, tenant, stage):
    """A "memory" overwrite of a block already on disk counts once in Stat, however far its
    write-back has got; the neighbouring namespace counts none of it.

    The write-back of this in-process daemon is held at ``stage`` so the window is certain."""
    disk = fresh_daemon.store.disk
    real_write = disk.write
    entered, release = threading.Event(), threading.Event()

    def held_write(*args, **kwargs):
        entered.set()
        if stage == "before-disk-write":
            release.wait(30)
        real_write(*args, **kwargs)
        if stage == "after-disk-write":
            release.wait(30)

    disk.write = held_write
    a = Client(fresh_daemon.address, tenant=tenant, subtenant="a")
    b = Client(fresh_daemon.address, tenant=tenant, subtenant="b")
    try:
        async with a, b:
            await a.put(b"k", b"x" * 100)  # disk durability: on disk, no write-back
            await a.put(b"other", b"o" * 7)
            await a.put(b"k", b"y" * 50, durability="memory")
            assert await asyncio.to_thread(entered.wait, 10)
            assert await a.get(b"k") == b"y" * 50
            assert await a.list() == [(b"k", 50), (b"other", 7)]
            stat = await a.stat()
            assert (stat["blocks"], stat["bytes"]) == (2, 57)
            assert ((await b.stat())["blocks"], await b.list()) == (0, [])
            release.set()
            for _ in range(200):  # until the write-back is done
                if not fresh_daemon.store.memory.dirty_bytes:
                    break
                await asyncio.sleep(0.01)
            stat = await a.stat()
            assert (stat["blocks"], stat["bytes"]) == (2, 57)
    finally:
        release.set()
        disk.write = real_write


async def test_dropping_a_leaves_b(daemon, pair):
    a, b = clients(daemon, pair)
    async with a, b:
        await a.put_many(ITEMS)
        await b.put_many(ITEMS[:2])
        dropped = await a.drop_namespace()
        assert (dropped["blocks"], dropped["bytes"]) == (len(ITEMS), sum(len(v) for _, v in ITEMS))
        assert await a.list() == []
        assert await b.get_many(KEYS[:2]) == [v for _, v in ITEMS[:2]]
        assert await b.list() == sorted((k, len(v)) for k, v in ITEMS[:2])
        assert (await b.stat())["blocks"] == 2


async def test_list_pages_stop_at_the_namespace_edge(daemon, pair):
    """Raw List: paging through A never walks into B's key range, nor reports more to come."""
    (ta, sa), (tb, sb) = pair
    na, nb = pb.Namespace(tenant=ta, subtenant=sa), pb.Namespace(tenant=tb, subtenant=sb)
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = data_pb2_grpc.DataStub(channel)

        async def put(ns, keys):
            blocks = [pb.BlockWrite(key=k, value=k, length=len(k), checksum=checksum(k)) for k in keys]
            assert (await stub.Put(pb.PutRequest(namespace=ns, blocks=blocks))).stored == len(keys)

        a_keys = [b"k%d" % i for i in range(5)]
        b_keys = [b"k%d" % i for i in range(3, 9)] + [b"\xff\xff"]
        await put(na, a_keys)
        await put(nb, b_keys)
        for ns, keys in ((na, a_keys), (nb, b_keys)):
            whole = await stub.List(pb.ListRequest(namespace=ns, limit=len(keys)))
            assert [(e.key, e.length) for e in whole.entries] == [(k, len(k)) for k in sorted(keys)]
            assert whole.truncated is False
            seen, after = [], b""
            while True:
                page = await stub.List(pb.ListRequest(namespace=ns, start_after=after, limit=2))
                seen += [e.key for e in page.entries]
                if not page.truncated:
                    break
                after = page.entries[-1].key
            assert seen == sorted(keys)
            # Starting after the last key, or after anything beyond it, finds nothing.
            for start in (sorted(keys)[-1], b"\xff" * 8):
                tail = await stub.List(pb.ListRequest(namespace=ns, start_after=start))
                assert (list(tail.entries), tail.truncated) == ([], False)


async def test_list_prefix_with_start_after_stays_within_the_prefix(daemon, tenant):
    """A List's prefix confines it even when start_after sorts before the prefix
    (the SDK never sends such a start_after; other clients of the wire contract may)."""
    ns, sibling = pb.Namespace(tenant=tenant, subtenant="s"), pb.Namespace(tenant=tenant, subtenant="s1")
    keys = [b"a1", b"b1", b"m1", b"m2", b"z1"]
    blocks = [pb.BlockWrite(key=k, value=k, length=len(k), checksum=checksum(k)) for k in keys]
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = data_pb2_grpc.DataStub(channel)
        await stub.Put(pb.PutRequest(namespace=ns, blocks=blocks))
        await stub.Put(pb.PutRequest(namespace=sibling, blocks=blocks))
        for start_after, expected in ((b"", [b"m1", b"m2"]), (b"m1", [b"m2"]), (b"m2", []), (b"a", [b"m1", b"m2"])):
            page = await stub.List(pb.ListRequest(namespace=ns, prefix=b"m", start_after=start_after))
            assert [e.key for e in page.entries] == expected, f"start_after={start_after!r}"
            assert page.truncated is False


def test_sync_clients_are_isolated(daemon, pair):
    (ta, sa), (tb, sb) = pair
    with SyncClient(daemon.address, tenant=ta, subtenant=sa) as a, SyncClient(
        daemon.address, tenant=tb, subtenant=sb
    ) as b:
        a.put(b"shared", b"from A")
        assert b.get(b"shared") is None
        assert b.exists([b"shared"]) == [False]
        assert b.lookup_prefix([b"shared"]) == 0
        assert b.list() == []
        assert b.delete([b"shared"]) == 0
        assert b.stat()["blocks"] == 0
        b.put(b"shared", b"from B")
        assert (a.get(b"shared"), b.get(b"shared")) == (b"from A", b"from B")
        assert a.namespaces(ta) == [
            {"tenant": ta, "subtenant": sa, "blocks": 1, "bytes": 6}
        ] + ([{"tenant": tb, "subtenant": sb, "blocks": 1, "bytes": 6}] if tb == ta else [])


# -- property: random keys in random namespaces ---------------------------------

NAMESPACES = 4  # two tenants, two subtenants each


@pytest.fixture(scope="module")
def sync_clients(daemon):
    u = _uid()
    names = [(f"H{u}{t}", f"sub{s}") for t in ("a", "b") for s in ("0", "1")]
    made = [SyncClient(daemon.address, tenant=t, subtenant=s) for t, s in names]
    for kv in made:
        kv.connect()
    yield made
    for kv in made:
        kv.close()


writes = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=NAMESPACES - 1),
        st.binary(min_size=1, max_size=12),
        st.binary(min_size=0, max_size=48),
    ),
    min_size=1,
    max_size=16,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=writes)
def test_random_keys_are_visible_only_in_their_namespace(sync_clients, writes):
    nonce = uuid.uuid4().hex.encode() + b"/"  # the daemon outlives examples: keep them apart
    model: list[dict[bytes, bytes]] = [{} for _ in range(NAMESPACES)]
    before = [kv.stat()["blocks"] for kv in sync_clients]
    for i, key, value in writes:
        sync_clients[i].put(nonce + key, value)
        model[i][nonce + key] = value
    every_key = sorted({k for m in model for k in m})
    for kv, own, start in zip(sync_clients, model, before):
        assert kv.get_many(every_key) == [own.get(k) for k in every_key]
        assert kv.exists(every_key) == [k in own for k in every_key]
        assert kv.list(nonce) == sorted((k, len(v)) for k, v in own.items())
        assert kv.stat()["blocks"] == start + len(own)
        foreign = [k for k in every_key if k not in own]
        if foreign:
            assert kv.lookup_prefix(foreign) == 0
            assert kv.delete(foreign) == 0
    # Deleting cleans up each namespace exactly; the others keep theirs until their turn.
    for kv, own, start in zip(sync_clients, model, before):
        assert kv.delete(list(own)) == len(own)
        assert kv.list(nonce) == []
        assert kv.stat()["blocks"] == start
