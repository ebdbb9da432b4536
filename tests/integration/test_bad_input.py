"""Every bad input is refused precisely, and refusing it costs the daemon nothing.

Each case is sent three ways where it can be:

* raw over gRPC (generated stubs, or ``channel.unary_unary`` with hand-made
  bytes for messages no stub would produce): the status must be
  INVALID_ARGUMENT with a message naming the problem, and the trailing
  ``kvstore-error-bin`` entry must hold the matching ``ErrorDetail``
  (code, the same message, the offending batch index);
* through the SDK's translation of that very status
  (``kvstore.protocol.status.error_from_rpc``), which must give the typed
  exception with the same code and index;
* through the SDK itself (``Client`` / ``SyncClient``), which refuses what it
  can check locally and translates what only the daemon can check.

After every refusal the daemon must keep serving: a good put/get in another
namespace succeeds, byte-exact.
"""

from __future__ import annotations

import os
import random
import re
import time
import uuid

import grpc
import pytest
from google.protobuf.message import DecodeError

from kvstore import errors
from kvstore._proto.v1 import data_pb2 as pb
from kvstore._proto.v1 import data_pb2_grpc, errors_pb2
from kvstore.checksum import checksum
from kvstore.client import Client, SyncClient
from kvstore.errors import InvalidArgumentError, UnavailableError
from kvstore.protocol.status import error_from_rpc as translate
from tests.conftest import free_port

ERROR_DETAIL_KEY = "kvstore-error-bin"
MAX_VALUE = 96 << 20  # the session `daemon` fixture's max_value_size
SMALL_MAX_VALUE = 4096  # the `small_daemon` fixture's max_value_size
UNKNOWN_VARINT_FIELD = b"\x98\x06\x01"  # field 99, wire type 0 (varint), value 1
DATA_METHODS = ("Put", "Get", "Exists", "LookupPrefix", "Delete", "List", "Stat")
KEY_METHODS = ("Get", "Exists", "LookupPrefix", "Delete")
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


# -- helpers -------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits, n = n & 0x7F, n >> 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def block(key: bytes, value: bytes, *, length: int | None = None, sum_: int | None = None) -> pb.BlockWrite:
    return pb.BlockWrite(
        key=key,
        value=value,
        length=len(value) if length is None else length,
        checksum=checksum(value) if sum_ is None else sum_,
    )


def unique_ns(prefix: str = "t") -> pb.Namespace:
    return pb.Namespace(tenant=f"{prefix}-{uuid.uuid4().hex[:12]}", subtenant="s")


def request_for(method: str, namespace: pb.Namespace | None, keys: list[bytes]) -> bytes:
    """A serialized request of ``method`` naming ``keys`` (values are small and valid)."""
    ns = {} if namespace is None else {"namespace": namespace}
    if method == "Put":
        return pb.PutRequest(blocks=[block(k, b"v%d" % i) for i, k in enumerate(keys)], **ns).SerializeToString()
    if method == "Get":
        return pb.GetRequest(keys=keys, **ns).SerializeToString()
    if method in ("Exists", "LookupPrefix", "Delete"):
        return pb.KeysRequest(keys=keys, **ns).SerializeToString()
    if method == "List":
        return pb.ListRequest(**ns).SerializeToString()
    if method == "Stat":
        return pb.StatRequest(**ns).SerializeToString()
    raise AssertionError(method)


class Raw:
    """Raw access to one daemon: bytes in, bytes (or an AioRpcError) out."""

    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.channel = channel
        self.address = address
        self.stub = data_pb2_grpc.DataStub(channel)
        self._methods = {m: channel.unary_unary(f"/kvstore.v1.Data/{m}") for m in DATA_METHODS}

    async def call(self, method: str, payload: bytes) -> bytes:
        return await self._methods[method](payload, timeout=30)

    async def rejected(
        self,
        method: str,
        payload: bytes,
        code: str,
        message: str,
        index: int = -1,
        status: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
    ) -> errors.KVStoreError:
        """Send ``payload``; assert the exact status, message, ErrorDetail and SDK exception."""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await self.call(method, payload)
        exc = info.value
        assert exc.code() == status, (exc.code(), exc.details())
        details = exc.details()
        assert re.search(message, details), f"{details!r} does not match {message!r}"
        detail = error_detail(exc)
        assert errors_pb2.ErrorCode.Name(detail.code) == code, (detail, details)
        assert detail.message == details
        assert detail.index == index
        # The SDK's one translation point turns it into the typed exception.
        sdk = translate(exc, self.address)
        assert type(sdk) is InvalidArgumentError
        assert (sdk.code, sdk.index, sdk.retryable) == (code, index, False)
        assert details in sdk.message
        await self.assert_serving()
        return sdk

    async def assert_serving(self) -> None:
        """A good put then get, in a namespace of its own, succeeds byte-exact."""
        ns = unique_ns("alive")
        value = os.urandom(257)
        put = await self.stub.Put(pb.PutRequest(namespace=ns, blocks=[block(b"alive", value)]), timeout=30)
        assert put.stored == 1
        got = await self.stub.Get(pb.GetRequest(namespace=ns, keys=[b"alive", b"absent"]), timeout=30)
        assert [(r.found, r.value) for r in got.results] == [(True, value), (False, b"")]
        assert got.results[0].checksum == checksum(value)

    async def stored(self, ns: pb.Namespace, keys: list[bytes]) -> list[bool]:
        response = await self.stub.Exists(pb.KeysRequest(namespace=ns, keys=keys), timeout=30)
        return list(response.exists)


def error_detail(exc: grpc.aio.AioRpcError) -> errors_pb2.ErrorDetail:
    entries = [value for key, value in (exc.trailing_metadata() or ()) if key == ERROR_DETAIL_KEY]
    assert len(entries) == 1, f"expected one {ERROR_DETAIL_KEY} entry, got {exc.trailing_metadata()!r}"
    return errors_pb2.ErrorDetail.FromString(entries[0])


@pytest.fixture
async def raw(daemon):
    async with grpc.aio.insecure_channel(daemon.address, options=CHANNEL_OPTIONS) as channel:
        yield Raw(channel, daemon.address)


@pytest.fixture(scope="module")
def small_daemon(daemon, tmp_path_factory):
    """A daemon of this module's own with a tiny max_value_size (same class as `daemon`)."""
    d = type(daemon)(tmp_path_factory.mktemp("small"), memory=16 << 20, max_value_size=SMALL_MAX_VALUE)
    yield d
    d.stop()


@pytest.fixture
async def small_raw(small_daemon):
    async with grpc.aio.insecure_channel(small_daemon.address, options=CHANNEL_OPTIONS) as channel:
        yield Raw(channel, small_daemon.address)


# -- keys ----------------------------------------------------------------------


BAD_KEYS = {
    "empty": (b"", "EMPTY_KEY", r"\bkey 2\b.*\bempty\b"),
    "1025-bytes": (b"k" * 1025, "KEY_TOO_LARGE", r"\bkey 2\b.*\b1025 bytes\b.*\b1024\b"),
}


@pytest.mark.parametrize("method", ("Put",) + KEY_METHODS)
@pytest.mark.parametrize("bad", BAD_KEYS, ids=str)
async def test_bad_key_raw_is_refused_with_its_index(raw, method, bad):
    key, code, message = BAD_KEYS[bad]
    ns = unique_ns()
    await raw.assert_serving()
    # A good key of 1024 bytes first, so the limit's edge is on both sides.
    keys = [b"good-0", b"g" * 1024, key, b"good-3"]
    await raw.rejected(method, request_for(method, ns, keys), code, message, index=2)
    assert await raw.stored(ns, [b"good-0", b"g" * 1024, b"good-3"]) == [False, False, False]


async def test_key_of_1024_bytes_works_everywhere(raw, daemon, tenant):
    key = bytes(range(256)) * 4
    assert len(key) == 1024
    ns = pb.Namespace(tenant=tenant, subtenant="raw")
    value = os.urandom(1000)
    assert (await raw.stub.Put(pb.PutRequest(namespace=ns, blocks=[block(key, value)]))).stored == 1
    got = await raw.stub.Get(pb.GetRequest(namespace=ns, keys=[key]))
    assert [(r.found, r.value) for r in got.results] == [(True, value)]
    assert list((await raw.stub.Exists(pb.KeysRequest(namespace=ns, keys=[key]))).exists) == [True]
    assert (await raw.stub.LookupPrefix(pb.KeysRequest(namespace=ns, keys=[key]))).count == 1
    listed = await raw.stub.List(pb.ListRequest(namespace=ns, prefix=key))
    assert [(e.key, e.length) for e in listed.entries] == [(key, 1000)]
    assert (await raw.stub.Delete(pb.KeysRequest(namespace=ns, keys=[key]))).deleted == 1

    async with Client(daemon.address, tenant=tenant) as kv:
        await kv.put(key, value)
        assert await kv.get(key) == value
        assert await kv.exists([key]) == [True]
        assert await kv.delete([key]) == 1


@pytest.mark.parametrize("field", ["prefix", "start_after"])
async def test_list_prefix_and_start_after_over_1024_bytes(raw, field):
    ns = unique_ns()
    await raw.rejected(
        "List", pb.ListRequest(namespace=ns, **{field: b"p" * 1025}).SerializeToString(), "KEY_TOO_LARGE", r"\b1024\b"
    )
    ok = await raw.stub.List(pb.ListRequest(namespace=ns, **{field: b"p" * 1024}))
    assert list(ok.entries) == [] and not ok.truncated


async def test_bad_keys_through_the_sdk(daemon, tenant):
    async with Client(daemon.address, tenant=tenant) as kv:
        for call in (
            lambda k: kv.put(k, b"v"),
            lambda k: kv.get(k),
            lambda k: kv.exists([k]),
            lambda k: kv.lookup_prefix([k]),
            lambda k: kv.delete([k]),
        ):
            with pytest.raises(InvalidArgumentError) as info:
                await call(b"")
            assert (type(info.value), info.value.code, info.value.index) == (InvalidArgumentError, "EMPTY_KEY", 0)
            with pytest.raises(InvalidArgumentError) as info:
                await call(b"x" * 1025)
            assert (type(info.value), info.value.code, info.value.index) == (InvalidArgumentError, "KEY_TOO_LARGE", 0)
            assert "1025" in info.value.message and "1024" in info.value.message
            assert info.value.retryable is False
        # The batch index is the entry's position in the caller's batch.
        with pytest.raises(InvalidArgumentError) as info:
            await kv.get_many([b"a", b"b", b"", b"c"])
        assert (info.value.code, info.value.index) == ("EMPTY_KEY", 2)
        with pytest.raises(InvalidArgumentError) as info:
            await kv.put_many([(b"a", b"1"), (b"b", b"2"), (b"c", b"3"), (b"d" * 1025, b"4"), (b"e", b"5")])
        assert (info.value.code, info.value.index) == ("KEY_TOO_LARGE", 3)
        assert await kv.exists([b"a", b"b", b"c", b"e"]) == [False] * 4
        # ...and the client is still usable.
        await kv.put(b"after", b"fine")
        assert await kv.get(b"after") == b"fine"


@pytest.mark.parametrize(
    "key, kind",
    [("text", "str"), (12345, "int"), (-1, "int"), (None, "NoneType"), (3.5, "float"), ([1, 2, 3], "list")],
    ids=["str", "int", "negative-int", "None", "float", "list"],
)
async def test_key_of_wrong_type_through_the_sdk(daemon, tenant, key, kind):
    async with Client(daemon.address, tenant=tenant) as kv:
        for call, index in (
            (lambda: kv.put(key, b"v"), 0),
            (lambda: kv.get(key), 0),
            (lambda: kv.exists([b"ok", key]), 1),
            (lambda: kv.delete([b"ok", key]), 1),
            (lambda: kv.lookup_prefix([b"ok", key]), 1),
            (lambda: kv.put_many([(b"ok", b"v"), (key, b"v")]), 1),
        ):
            with pytest.raises(InvalidArgumentError) as info:
                await call()
            exc = info.value
            assert type(exc) is InvalidArgumentError
            assert exc.code == "INVALID_ARGUMENT"
            assert exc.index == index
            assert kind in exc.message and "bytes" in exc.message
            assert exc.retryable is False
        # Nothing was stored under any coercion of the key (e.g. bytes(12345) zeros).
        assert await kv.list() == []
        assert (await kv.stat())["blocks"] == 0


def test_key_of_wrong_type_through_the_sync_client(daemon, tenant):
    with SyncClient(daemon.address, tenant=tenant) as kv:
        with pytest.raises(InvalidArgumentError) as info:
            kv.put("text", b"v")
        assert (type(info.value), info.value.code, info.value.index) == (InvalidArgumentError, "INVALID_ARGUMENT", 0)
        with pytest.raises(InvalidArgumentError) as info:
            kv.get_many([b"a", "b"])
        assert (info.value.code, info.value.index) == ("INVALID_ARGUMENT", 1)
        with pytest.raises(InvalidArgumentError) as info:
            kv.list("prefix")
        assert info.value.code == "INVALID_ARGUMENT"
        kv.put(b"k", b"v")
        assert kv.get(b"k") == b"v"


# -- values ----------------------------------------------------------------------


async def test_declared_length_over_the_max_is_refused(raw):
    ns = unique_ns()
    for length in (MAX_VALUE + 1, 2**64 - 1):
        request = pb.PutRequest(
            namespace=ns, blocks=[block(b"a", b"1"), block(b"big", b"x", length=length), block(b"c", b"3")]
        )
        await raw.rejected(
            "Put", request.SerializeToString(), "VALUE_TOO_LARGE", rf"\bblock 1\b.*\b{length}\b.*\b{MAX_VALUE}\b", index=1
        )
    assert await raw.stored(ns, [b"a", b"big", b"c"]) == [False, False, False]


async def test_real_value_just_over_the_max_is_refused(raw, daemon):
    # gRPC's message limit is max(max_value_size, 64 MiB) + 4 MiB, so max + 1 still arrives.
    assert MAX_VALUE + 1 + 1024 < max(MAX_VALUE, 64 << 20) + (4 << 20)
    assert daemon.config.max_value_size == MAX_VALUE
    value = bytes(MAX_VALUE + 1)
    ns = unique_ns()
    request = pb.PutRequest(namespace=ns, blocks=[pb.BlockWrite(key=b"big", value=value, length=len(value), checksum=0)])
    payload = request.SerializeToString()
    del request, value
    await raw.rejected("Put", payload, "VALUE_TOO_LARGE", rf"\bblock 0\b.*\b{MAX_VALUE + 1}\b.*\b{MAX_VALUE}\b", index=0)
    assert await raw.stored(ns, [b"big"]) == [False]


async def test_value_limit_edge_on_a_small_daemon(small_raw):
    ns = unique_ns()
    exact = os.urandom(SMALL_MAX_VALUE)
    assert (await small_raw.stub.Put(pb.PutRequest(namespace=ns, blocks=[block(b"exact", exact)]))).stored == 1
    over = os.urandom(SMALL_MAX_VALUE + 1)
    await small_raw.rejected(
        "Put",
        pb.PutRequest(namespace=ns, blocks=[block(b"over", over)]).SerializeToString(),
        "VALUE_TOO_LARGE",
        rf"\b{SMALL_MAX_VALUE + 1}\b.*\b{SMALL_MAX_VALUE}\b",
        index=0,
    )
    got = await small_raw.stub.Get(pb.GetRequest(namespace=ns, keys=[b"exact", b"over"]))
    assert [(r.found, r.value) for r in got.results] == [(True, exact), (False, b"")]


async def test_sdk_checks_the_limit_the_daemon_announced(daemon, tenant):
    async with Client(daemon.address, tenant=tenant) as kv:
        assert kv.max_value_bytes == MAX_VALUE
        big = bytes(MAX_VALUE + 1)
        with pytest.raises(InvalidArgumentError) as info:
            await kv.put(b"big", big)
        exc = info.value
        assert (type(exc), exc.code, exc.index, exc.retryable) == (InvalidArgumentError, "VALUE_TOO_LARGE", 0, False)
        assert str(MAX_VALUE + 1) in exc.message and str(MAX_VALUE) in exc.message
        with pytest.raises(InvalidArgumentError) as info:
            await kv.put_many([(b"a", b"1"), (b"big", big), (b"c", b"3")])
        assert (info.value.code, info.value.index) == ("VALUE_TOO_LARGE", 1)
        del big
        assert await kv.exists([b"a", b"big", b"c"]) == [False, False, False]


def test_sync_client_checks_the_announced_limit_of_a_small_daemon(small_daemon, tenant):
    with SyncClient(small_daemon.address, tenant=tenant) as kv:
        exact = os.urandom(SMALL_MAX_VALUE)
        kv.put(b"exact", exact)
        with pytest.raises(InvalidArgumentError) as info:
            kv.put(b"over", os.urandom(SMALL_MAX_VALUE + 1))
        assert (type(info.value), info.value.code, info.value.index) == (InvalidArgumentError, "VALUE_TOO_LARGE", 0)
        assert kv.get_many([b"exact", b"over"]) == [exact, None]


async def test_sdk_reports_the_daemons_batch_index_and_stores_nothing(small_daemon, tenant):
    """A client that believes the limit is higher (a stale Hello) learns it from the daemon."""
    items = [(b"a", b"1"), (b"b", b"2"), (b"c", os.urandom(SMALL_MAX_VALUE + 1)), (b"d", b"4")]
    async with Client(small_daemon.address, tenant=tenant) as kv:
        kv._nodes.limits.max_value_bytes = 1 << 20
        with pytest.raises(InvalidArgumentError) as info:
            await kv.put_many(items)
        exc = info.value
        assert (type(exc), exc.code, exc.index, exc.retryable) == (InvalidArgumentError, "VALUE_TOO_LARGE", 2, False)
        assert str(SMALL_MAX_VALUE) in exc.message
        assert await kv.exists([k for k, _ in items]) == [False] * 4
    # Split into RPCs of two: the bad entry is the second of the second RPC, index 3 overall.
    async with Client(small_daemon.address, tenant=tenant, subtenant="split", max_batch_keys=2) as kv:
        kv._nodes.limits.max_value_bytes = 1 << 20
        with pytest.raises(InvalidArgumentError) as info:
            await kv.put_many(items[:2] + [(b"c", b"3"), (b"d", items[2][1])])
        assert (info.value.code, info.value.index) == ("VALUE_TOO_LARGE", 3)
        assert await kv.exists([b"c", b"d"]) == [False, False]


# -- length and checksum ---------------------------------------------------------


@pytest.mark.parametrize("declared", [0, 2, 4, 1000])
async def test_length_not_matching_the_bytes(raw, declared):
    ns = unique_ns()
    request = pb.PutRequest(
        namespace=ns,
        blocks=[block(b"a", b"111"), block(b"b", b"222"), block(b"c", b"333", length=declared), block(b"d", b"444")],
    )
    await raw.rejected(
        "Put", request.SerializeToString(), "LENGTH_MISMATCH", rf"\bblock 2\b.*\b{declared}\b.*\b3 bytes\b", index=2
    )
    assert await raw.stored(ns, [b"a", b"b", b"c", b"d"]) == [False] * 4


@pytest.mark.parametrize("value", [b"", b"x", os.urandom(70_000)], ids=["empty", "1B", "70KB"])
async def test_checksum_not_matching_the_bytes(raw, value):
    ns = unique_ns()
    wrong = checksum(value) ^ 1
    request = pb.PutRequest(
        namespace=ns, blocks=[block(b"a", b"1"), block(b"bad", value, sum_=wrong), block(b"c", b"3")]
    )
    await raw.rejected(
        "Put", request.SerializeToString(), "CHECKSUM_MISMATCH", rf"\bblock 1\b.*{wrong:#018x}", index=1
    )
    assert await raw.stored(ns, [b"a", b"bad", b"c"]) == [False] * 3


@pytest.mark.parametrize("transport", ["inline", "auto"])
async def test_sdk_translates_a_checksum_mismatch(daemon, tenant, monkeypatch, transport):
    """A writer whose checksums are wrong (a bug, a bit flip) is refused with the entry's index,
    whether values travel inline or are read from the client's memory by the daemon."""
    import kvstore.client.regions as regions
    import kvstore.client.writes as writes

    real = writes.checksum
    flipped = lambda data: real(data) ^ (1 if bytes(data) == b"flipped" else 0)  # noqa: E731
    monkeypatch.setattr(writes, "checksum", flipped)
    monkeypatch.setattr(regions, "checksum", flipped)
    async with Client(daemon.address, tenant=tenant, transport=transport) as kv:
        with pytest.raises(InvalidArgumentError) as info:
            await kv.put_many([(b"a", b"1"), (b"b", b"2"), (b"c", b"flipped"), (b"d", b"4")])
        exc = info.value
        assert (type(exc), exc.code, exc.index, exc.retryable) == (InvalidArgumentError, "CHECKSUM_MISMATCH", 2, False)
        assert await kv.exists([b"a", b"b", b"c", b"d"]) == [False] * 4
        await kv.put(b"fine", b"fine")
        assert await kv.get(b"fine") == b"fine"


@pytest.mark.parametrize(
    "bad, code, message",
    [
        (lambda: block(b"", b"v"), "EMPTY_KEY", r"\bkey 2\b.*\bempty\b"),
        (lambda: block(b"k" * 1025, b"v"), "KEY_TOO_LARGE", r"\b1025\b"),
        (lambda: block(b"k", b"v", length=MAX_VALUE + 1), "VALUE_TOO_LARGE", rf"\b{MAX_VALUE}\b"),
        (lambda: block(b"k", b"vvv", length=2), "LENGTH_MISMATCH", r"\bblock 2\b"),
        (lambda: block(b"k", b"vvv", sum_=1), "CHECKSUM_MISMATCH", r"\bblock 2\b"),
    ],
    ids=["empty-key", "long-key", "too-large", "length", "checksum"],
)
async def test_bad_block_in_the_middle_of_a_batch_stores_nothing(raw, bad, code, message):
    ns = unique_ns()
    good = [block(b"good-%d" % i, os.urandom(100 + i)) for i in range(5)]
    blocks = good[:2] + [bad()] + good[2:]
    request = pb.PutRequest(namespace=ns, blocks=blocks, durability=pb.DURABILITY_MEMORY)
    await raw.rejected("Put", request.SerializeToString(), code, message, index=2)
    keys = [b.key for b in good]
    assert await raw.stored(ns, keys) == [False] * 5
    stat = await raw.stub.Stat(pb.StatRequest(namespace=ns))
    assert (stat.stats.blocks, stat.stats.bytes) == (0, 0)
    # The same batch without the bad block goes through whole.
    assert (await raw.stub.Put(pb.PutRequest(namespace=ns, blocks=good))).stored == 5
    assert await raw.stored(ns, keys) == [True] * 5


async def test_batches_over_the_daemons_limits(raw):
    ns = unique_ns()
    keys = [b"k%d" % i for i in range(100_001)]
    await raw.rejected(
        "Exists", pb.KeysRequest(namespace=ns, keys=keys).SerializeToString(), "BATCH_TOO_LARGE", r"\b100001\b.*\b100000\b"
    )
    empty = checksum(b"")
    request = pb.PutRequest(namespace=ns, blocks=[pb.BlockWrite(key=k, checksum=empty) for k in keys])
    await raw.rejected("Put", request.SerializeToString(), "BATCH_TOO_LARGE", r"\b100001 blocks\b.*\b100000\b")
    assert await raw.stored(ns, keys[:3]) == [False] * 3
    await raw.rejected("List", pb.ListRequest(namespace=ns, limit=10_001).SerializeToString(), "BATCH_TOO_LARGE", r"\b10001\b")
    ok = await raw.stub.List(pb.ListRequest(namespace=ns, limit=10_000))
    assert (list(ok.entries), ok.truncated) == ([], False)


# -- durability ------------------------------------------------------------------


@pytest.mark.parametrize("level", [7, 4, -1])
async def test_unknown_durability_raw(raw, level):
    ns = unique_ns()
    request = pb.PutRequest(namespace=ns, blocks=[block(b"k", b"v")], durability=level)
    await raw.rejected("Put", request.SerializeToString(), "UNKNOWN_DURABILITY", rf"durability {level}\b")
    assert await raw.stored(ns, [b"k"]) == [False]


async def test_unknown_durability_through_the_sdk(daemon, tenant):
    async with Client(daemon.address, tenant=tenant) as kv:
        for level in ("fast", "DISKY", ""):
            for call in (lambda: kv.put(b"k", b"v", durability=level), lambda: kv.put_many([(b"k", b"v")], level)):
                if level == "":
                    # No durability given means the configured default: stored.
                    await call()
                    continue
                with pytest.raises(InvalidArgumentError) as info:
                    await call()
                exc = info.value
                assert (type(exc), exc.code, exc.retryable) == (InvalidArgumentError, "UNKNOWN_DURABILITY", False)
                assert repr(level) in exc.message
        assert await kv.list() == [(b"k", 1)]
    with SyncClient(daemon.address, tenant=tenant, subtenant="sync") as kv:
        with pytest.raises(InvalidArgumentError) as info:
            kv.put(b"k", b"v", durability="fast")
        assert (type(info.value), info.value.code) == (InvalidArgumentError, "UNKNOWN_DURABILITY")
        assert kv.exists([b"k"]) == [False]
        kv.put(b"k", b"v", durability="sync")
        assert kv.get(b"k") == b"v"


# -- unknown fields --------------------------------------------------------------


def _put_with_nested_unknown(ns: pb.Namespace) -> bytes:
    good = block(b"a", b"1").SerializeToString()
    tainted = block(b"b", b"2").SerializeToString() + UNKNOWN_VARINT_FIELD
    return _field(1, ns.SerializeToString()) + _field(2, good) + _field(2, tainted)


def _get_with_unknown_in_namespace(ns: pb.Namespace) -> bytes:
    return _field(1, ns.SerializeToString() + UNKNOWN_VARINT_FIELD) + _field(2, b"k")


UNKNOWN_FIELD_CASES = {
    "PutRequest": ("Put", lambda ns: request_for("Put", ns, [b"a", b"b"]) + UNKNOWN_VARINT_FIELD, "PutRequest"),
    "PutRequest-string-field": ("Put", lambda ns: request_for("Put", ns, [b"a"]) + _field(15, b"future"), "PutRequest"),
    "GetRequest": ("Get", lambda ns: request_for("Get", ns, [b"a"]) + UNKNOWN_VARINT_FIELD, "GetRequest"),
    "BlockWrite": ("Put", _put_with_nested_unknown, "PutRequest"),
    "Namespace-in-Get": ("Get", _get_with_unknown_in_namespace, "GetRequest"),
    "KeysRequest": ("Delete", lambda ns: request_for("Delete", ns, [b"a"]) + UNKNOWN_VARINT_FIELD, "KeysRequest"),
    "ListRequest": ("List", lambda ns: request_for("List", ns, []) + UNKNOWN_VARINT_FIELD, "ListRequest"),
    "StatRequest": ("Stat", lambda ns: request_for("Stat", ns, []) + UNKNOWN_VARINT_FIELD, "StatRequest"),
}


@pytest.mark.parametrize("case", UNKNOWN_FIELD_CASES, ids=str)
async def test_unknown_fields_are_refused(raw, case):
    method, build, name = UNKNOWN_FIELD_CASES[case]
    ns = unique_ns()
    payload = build(ns)
    # The bytes are well-formed protobuf: only the unknown field is wrong.
    parsed = getattr(pb, name).FromString(payload)
    assert parsed.namespace.tenant == ns.tenant
    await raw.rejected(method, payload, "UNKNOWN_FIELD", rf"\b{name}\b.*unknown")
    if method == "Put":
        assert await raw.stored(ns, [b"a", b"b"]) == [False, False]


# -- malformed messages ----------------------------------------------------------


def _garbage(seed: int, n: int, message_type) -> list[bytes]:
    """Random byte strings that protobuf itself refuses to parse as ``message_type``."""
    rng = random.Random(seed)
    found = []
    while len(found) < n:
        candidate = rng.randbytes(rng.randint(1, 512))
        try:
            message_type.FromString(candidate)
        except DecodeError:
            found.append(candidate)
    return found


@pytest.mark.parametrize("method", DATA_METHODS)
async def test_random_garbage_is_malformed(raw, method):
    request_type = {
        "Put": pb.PutRequest, "Get": pb.GetRequest, "List": pb.ListRequest, "Stat": pb.StatRequest,
    }.get(method, pb.KeysRequest)
    payloads = [b"\xff" * 16, b"\x0f", b"\x0a\xff\x01"] + _garbage(DATA_METHODS.index(method), 5, request_type)
    for payload in payloads:
        await raw.rejected(method, payload, "MALFORMED_REQUEST", rf"malformed {request_type.DESCRIPTOR.name}\b")


@pytest.mark.parametrize("method", ["Put", "Get", "Delete"])
async def test_truncated_messages_are_malformed(raw, method):
    ns = unique_ns()
    if method == "Put":
        whole = pb.PutRequest(namespace=ns, blocks=[block(b"k%d" % i, os.urandom(200)) for i in range(3)]).SerializeToString()
    else:
        whole = request_for(method, ns, [b"key-%03d" % i for i in range(20)])
    name = {"Put": "PutRequest", "Get": "GetRequest"}.get(method, "KeysRequest")
    # Cut inside the last length-delimited field (and deeper inside it).
    for cut in (1, 3, 50):
        await raw.rejected(method, whole[:-cut], "MALFORMED_REQUEST", rf"malformed {name}\b")
    if method == "Put":
        assert await raw.stored(ns, [b"k0", b"k1", b"k2"]) == [False] * 3


async def test_tenant_that_is_not_utf8_is_malformed(raw):
    payload = _field(1, _field(1, b"\xff\xfe") + _field(2, b"s"))
    await raw.rejected("Stat", payload, "MALFORMED_REQUEST", r"malformed StatRequest\b")


# -- namespaces ------------------------------------------------------------------


BAD_NAMESPACES = {
    "missing": (None, r"no namespace"),
    "empty-tenant": (pb.Namespace(tenant="", subtenant="s"), r"\btenant '' is invalid"),
    "empty-subtenant": (pb.Namespace(tenant="t", subtenant=""), r"\bsubtenant '' is invalid"),
    "space": (pb.Namespace(tenant="has space", subtenant="s"), r"\btenant 'has space' is invalid"),
    "slash": (pb.Namespace(tenant="a/b", subtenant="s"), r"\btenant 'a/b' is invalid"),
    # (a long name may be shown shortened)
    "129-chars": (pb.Namespace(tenant="t" * 129, subtenant="s"), r"\btenant 't{16,}.*\binvalid\b"),
    "non-ascii": (pb.Namespace(tenant="caf\u00e9", subtenant="s"), r"\btenant 'caf\u00e9' is invalid"),
    "newline": (pb.Namespace(tenant="ok", subtenant="ok\n"), r"\bsubtenant 'ok\\n' is invalid"),
}


@pytest.mark.parametrize("method", DATA_METHODS)
async def test_bad_namespace_raw(raw, method):
    for name, (ns, message) in BAD_NAMESPACES.items():
        await raw.rejected(method, request_for(method, ns, [b"k"]), "INVALID_NAMESPACE", message)


@pytest.mark.parametrize("field, length", [("tenant", 10_000), ("subtenant", 1_000_000)])
async def test_overlong_namespace_name_is_refused_as_invalid(raw, field, length):
    """However long a bad name is, the refusal stays INVALID_ARGUMENT with its ErrorDetail
    (echoing the whole name would overflow gRPC's 16 KiB metadata limit: RESOURCE_EXHAUSTED,
    which the SDK would take for a retryable ResourceExhaustedError)."""
    ns = pb.Namespace(**{"tenant": "t", "subtenant": "s", field: "n" * length})
    for method in ("Put", "Get", "Stat"):
        sdk = await raw.rejected(method, request_for(method, ns, [b"k"]), "INVALID_NAMESPACE", rf"\b{field}\b.*\binvalid\b")
        assert sdk.retryable is False


async def test_namespace_name_edges_are_accepted(raw):
    for ns in (
        pb.Namespace(tenant="t" * 128, subtenant="s" * 128),
        pb.Namespace(tenant="A-Za-z0-9._:" + uuid.uuid4().hex, subtenant="-"),
    ):
        assert (await raw.stub.Put(pb.PutRequest(namespace=ns, blocks=[block(b"k", b"edge")]))).stored == 1
        got = await raw.stub.Get(pb.GetRequest(namespace=ns, keys=[b"k"]))
        assert [(r.found, r.value) for r in got.results] == [(True, b"edge")]
        assert (await raw.stub.Delete(pb.KeysRequest(namespace=ns, keys=[b"k"]))).deleted == 1


@pytest.mark.parametrize(
    "settings", [{"tenant": "has space"}, {"tenant": "t" * 129}, {"subtenant": "a/b"}, {"tenant": ""}],
    ids=["space", "129-chars", "slash-subtenant", "empty-tenant"],
)
def test_sdk_refuses_invalid_namespace_names(daemon, settings):
    with pytest.raises(InvalidArgumentError) as info:
        Client(daemon.address, **settings)
    assert info.value.code == "INVALID_NAMESPACE"
    assert info.value.retryable is False


async def test_sdk_translates_the_daemons_namespace_refusal(daemon, tenant):
    async with Client(daemon.address, tenant=tenant) as kv:
        kv.namespace.tenant = "not valid"  # what an older or foreign client might send
        for call in (lambda: kv.put(b"k", b"v"), lambda: kv.get(b"k"), lambda: kv.stat(), lambda: kv.list()):
            with pytest.raises(InvalidArgumentError) as info:
                await call()
            exc = info.value
            assert (type(exc), exc.code, exc.index, exc.retryable) == (InvalidArgumentError, "INVALID_NAMESPACE", -1, False)
            assert "'not valid'" in exc.message
        kv.namespace.tenant = tenant
        await kv.put(b"k", b"v")
        assert await kv.get(b"k") == b"v"


async def test_sdk_refusal_of_an_overlong_name_is_not_retryable(daemon, tenant):
    async with Client(daemon.address, tenant=tenant) as kv:
        kv.namespace.subtenant = "s" * 10_000  # the daemon, not the SDK, refuses it here
        with pytest.raises(InvalidArgumentError) as info:
            await kv.stat()
        assert (type(info.value), info.value.code, info.value.retryable) == (InvalidArgumentError, "INVALID_NAMESPACE", False)


# -- an unreachable daemon ---------------------------------------------------------


async def test_no_daemon_is_unavailable_and_retryable():
    address = f"127.0.0.1:{free_port()}"
    kv = Client(address, tenant="nobody", connect_timeout=0.5, timeout=2)
    try:
        with pytest.raises(UnavailableError) as info:
            await kv.put(b"k", b"v")
        assert type(info.value) is UnavailableError
        assert info.value.retryable is True
        assert address in info.value.message
        with pytest.raises(UnavailableError):
            await kv.get(b"k")
    finally:
        await kv.close()


def test_no_daemon_is_unavailable_through_the_sync_client():
    kv = SyncClient(f"127.0.0.1:{free_port()}", tenant="nobody", connect_timeout=0.5, timeout=2)
    try:
        with pytest.raises(UnavailableError) as info:
            kv.connect()
        assert info.value.retryable is True
        with pytest.raises(UnavailableError) as info:
            kv.get(b"k")
        assert info.value.retryable is True
    finally:
        kv.close()


async def test_daemon_that_went_away_is_unavailable(daemon, tmp_path):
    gone = type(daemon)(tmp_path / "gone", memory=4 << 20)
    kv = Client(gone.address, tenant="leaving", timeout=5)
    strict = Client(gone.address, tenant="leaving", timeout=5, read_failures="raise")
    try:
        await kv.put(b"k", b"v")
        assert await kv.get(b"k") == b"v"
        assert await strict.get(b"k") == b"v"
        gone.stop()
        # An engine's default: a read no replica can serve is a miss, fast.
        started = time.monotonic()
        assert await kv.get(b"k") is None
        assert await kv.get_many([b"k", b"other"]) == [None, None]
        assert time.monotonic() - started < 2
        with pytest.raises(UnavailableError) as info:
            await strict.get(b"k")
        assert type(info.value) is UnavailableError
        assert info.value.retryable is True
        with pytest.raises(UnavailableError):
            await kv.put(b"k", b"v2")
    finally:
        await kv.close()
        await strict.close()


def test_retryable_split_of_the_error_classes():
    assert InvalidArgumentError("x").retryable is False
    assert InvalidArgumentError("x", code="KEY_TOO_LARGE").code == "KEY_TOO_LARGE"
    assert UnavailableError("x").retryable is True
    assert issubclass(UnavailableError, errors.RetryableError)
    assert not issubclass(InvalidArgumentError, errors.RetryableError)
