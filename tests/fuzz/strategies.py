"""Hypothesis strategies of hostile kvstore requests.

Two kinds of input:

* well-typed messages (``requests(method, world)``): every field of the
  request type, found through its protobuf descriptor so that a field added
  to the protos is fuzzed too, with hostile values - uint64 edges (2**64-1,
  2**63, a value just past the daemon's limits), empty, oversized and non-ASCII
  names, empty and 1025-byte keys, random bytes where an rkey, session or
  worker address belongs, random SharedMemory pid/fd/token, slot lists that
  do not match the keys - and, mixed in, values that are valid (keys the
  daemon holds, namespaces in use, the live session and rkey where the world
  has them), so that the daemon gets past its first check;
* raw bytes (``mutated(...)``): a serialized message after bit flips, byte
  insertions, deletions, truncation, duplication and injected fields of any
  number and wire type (overlong and 11-byte varints, lengths past the end).

``World`` is what a test knows of its daemon (namespaces, stored keys, its
limits, a live data-plane session); every strategy draws from it.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from kvstore._proto.v1 import admin_pb2, cluster_pb2, data_pb2
from kvstore.checksum import checksum

U64 = (1 << 64) - 1
NAME_CHARS = string.ascii_letters + string.digits + "._:-"
MAX_KEY = 1024
MAX_NAME = 128
MAX_BATCH_KEYS = 100_000  # server/rpc/data.py
LIST_LIMIT = 10_000  # ListRequest.limit the daemon takes (10 pages of 1000)

# Every RPC the fuzz sends, by service, with its request and response types.
# DropNamespace is left out: it is only sent on namespaces a test created itself
# (tests/fuzz/test_rpc_fuzz.py).
RPCS: dict[tuple[str, str], tuple[type, type]] = {
    ("Data", "Put"): (data_pb2.PutRequest, data_pb2.PutResponse),
    ("Data", "Get"): (data_pb2.GetRequest, data_pb2.GetResponse),
    ("Data", "Exists"): (data_pb2.KeysRequest, data_pb2.ExistsResponse),
    ("Data", "LookupPrefix"): (data_pb2.KeysRequest, data_pb2.LookupPrefixResponse),
    ("Data", "Delete"): (data_pb2.KeysRequest, data_pb2.DeleteResponse),
    ("Data", "List"): (data_pb2.ListRequest, data_pb2.ListResponse),
    ("Data", "Stat"): (data_pb2.StatRequest, data_pb2.StatResponse),
    ("Cluster", "GetClusterMap"): (cluster_pb2.GetClusterMapRequest, cluster_pb2.ClusterMap),
    ("Cluster", "Hello"): (cluster_pb2.HelloRequest, cluster_pb2.HelloResponse),
    ("Admin", "ListNamespaces"): (admin_pb2.ListNamespacesRequest, admin_pb2.ListNamespacesResponse),
    ("Admin", "ServerStats"): (admin_pb2.ServerStatsRequest, admin_pb2.ServerStatsResponse),
    ("Admin", "GetNamespacePolicy"): (admin_pb2.GetNamespacePolicyRequest, cluster_pb2.NamespacePolicy),
    ("Admin", "SetNamespacePolicy"): (admin_pb2.SetNamespacePolicyRequest, cluster_pb2.NamespacePolicy),
}
DROP = ("Admin", "DropNamespace")
ALL_TYPES = {**RPCS, DROP: (admin_pb2.DropNamespaceRequest, admin_pb2.DropNamespaceResponse)}


def path(service: str, method: str) -> str:
    return f"/kvstore.v1.{service}/{method}"


@dataclasses.dataclass
class World:
    """What the strategies know of the daemon under test."""

    max_value: int  # the daemon's max_value_size
    namespaces: list[data_pb2.Namespace]  # valid namespaces, some holding `keys`
    keys: list[bytes]  # keys stored in every namespace of `namespaces`
    sessions: list[bytes] = dataclasses.field(default_factory=list)  # live data-plane sessions
    rkeys: list[bytes] = dataclasses.field(default_factory=list)  # valid packed rkeys of registered memory
    worker_addresses: list[bytes] = dataclasses.field(default_factory=list)  # live UCX worker addresses
    pids: list[int] = dataclasses.field(default_factory=list)  # pids worth naming in SharedMemory
    epochs: list[int] = dataclasses.field(default_factory=list)  # cluster map epochs (routing metadata)


# -- building blocks ------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of ``choices``, each drawn in proportion to its weight (one_of has no weights)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def edges(bits: int, *extra: int) -> list[int]:
    top = (1 << bits) - 1
    near = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**32 - 1, 2**32]
    near += [2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
    near += [v + d for v in extra for d in (-1, 0, 1)]
    return sorted({v for v in near if 0 <= v <= top})


def uint(bits: int = 64, *extra: int) -> st.SearchStrategy[int]:
    """Unsigned integers of ``bits``: overflow edges, ``extra`` (+-1) and anything else."""
    return weighted((3, st.sampled_from(edges(bits, *extra))), (2, st.integers(0, (1 << bits) - 1)))


def sint(bits: int) -> st.SearchStrategy[int]:
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return st.one_of(st.sampled_from([low, -1, 0, 1, high]), st.integers(low, high))


def doubles() -> st.SearchStrategy[float]:
    specials = [0.0, -0.0, 1.0, -1.0, 5e-324, 1e-300, 1e300, 1.7976931348623157e308, float("inf"), float("-inf"), float("nan")]
    return st.one_of(st.sampled_from(specials), st.floats(allow_nan=True, allow_infinity=True))


def repeat(text: str, sizes: list[int]) -> st.SearchStrategy[str]:
    return st.sampled_from(sizes).map(lambda n: text * n)


def hostile_text() -> st.SearchStrategy[str]:
    """Strings no name accepts: empty, too long, spaces, slashes, control and non-ASCII characters."""
    return st.one_of(
        st.sampled_from(["", " ", "a b", "a/b", "..", "ok\n", "nul\x00", "caf\u00e9", "\u202e", "\U0001f600", "%s%n"]),
        repeat("n", [MAX_NAME + 1, 1000, 100_000]),
        st.text(max_size=40),
    )


def names(world: World) -> st.SearchStrategy[str]:
    """Tenant and subtenant names: those in use, other valid ones, edges, hostile ones."""
    used = sorted({ns.tenant for ns in world.namespaces} | {ns.subtenant for ns in world.namespaces})
    return weighted(
        (4, st.sampled_from(used)),
        (2, st.text(NAME_CHARS, min_size=1, max_size=12)),
        (1, st.sampled_from(["-", ".", ":", "t" * MAX_NAME, NAME_CHARS])),
        (3, hostile_text()),
    )


def namespaces(world: World) -> st.SearchStrategy[data_pb2.Namespace | None]:
    """A namespace in use, a valid new one, a hostile one, an empty one, or none at all."""
    return weighted(
        (5, st.sampled_from(world.namespaces)),
        (4, st.builds(data_pb2.Namespace, tenant=names(world), subtenant=names(world))),
        (1, st.just(data_pb2.Namespace())),
        (1, st.none()),
    )


def big_bytes(sizes: list[int]) -> st.SearchStrategy[bytes]:
    """Large byte strings, built not drawn (hypothesis would draw them byte by byte)."""
    return st.tuples(st.sampled_from(sizes), st.integers(0, 255)).map(lambda t: bytes([t[1]]) * t[0])


def keys(world: World) -> st.SearchStrategy[bytes]:
    return weighted(
        (4, st.sampled_from(world.keys)),
        (3, st.binary(min_size=1, max_size=24)),
        (1, st.just(b"")),
        (1, big_bytes([MAX_KEY - 1, MAX_KEY, MAX_KEY + 1, 1 << 16, 1 << 20])),
    )


def key_lists(world: World) -> st.SearchStrategy[list[bytes]]:
    """Short batches mostly; rarely the batch limit and one past it."""
    many = st.sampled_from([MAX_BATCH_KEYS, MAX_BATCH_KEYS + 1]).map(lambda n: [b"k%d" % i for i in range(n)])
    return weighted((30, st.lists(keys(world), max_size=6)), (1, many))


def random_bytes() -> st.SearchStrategy[bytes]:
    """Where an opaque token (rkey, session, worker address) belongs: noise of any length."""
    return st.one_of(st.binary(max_size=80), big_bytes([65 << 10, 1 << 20]))


def values(world: World) -> st.SearchStrategy[bytes]:
    limit = world.max_value
    return weighted((8, st.binary(max_size=300)), (1, big_bytes([limit, limit + 1, 1 << 20])))


def u64_near(world: World) -> st.SearchStrategy[int]:
    """uint64 with the daemon's value limit among the edges."""
    return uint(64, world.max_value, MAX_KEY)


# -- messages that need more than independent fields ------------------------------


def block_writes(world: World, remote: bool = False) -> st.SearchStrategy[data_pb2.BlockWrite]:
    """A block whose length and checksum match its value more often than not."""

    @st.composite
    def build(draw):
        value = b"" if remote and draw(st.booleans()) else draw(values(world))
        length = draw(st.one_of(st.just(len(value)), u64_near(world)))
        sum_ = draw(st.one_of(st.just(checksum(value)), uint(64)))
        address = draw(uint(64)) if draw(st.booleans()) else 0
        return data_pb2.BlockWrite(key=draw(keys(world)), value=value, length=length, checksum=sum_, remote_address=address)

    return build()


def shared_memory(world: World) -> st.SearchStrategy[data_pb2.SharedMemory]:
    """A SharedMemory descriptor naming random or real pids, fds and tokens."""
    pids = st.sampled_from(world.pids or [1]) if world.pids else st.just(1)
    return st.builds(
        data_pb2.SharedMemory,
        pid=st.one_of(pids, uint(32)),
        fd=st.one_of(st.sampled_from([0, 1, 2, 3]), uint(32)),
        token=st.one_of(st.text("0123456789abcdef", min_size=32, max_size=32), hostile_text()),
        length=uint(64, world.max_value),
        address=uint(64),
        checksums_omitted=st.booleans(),
    )


def remote_regions(world: World) -> st.SearchStrategy[data_pb2.RemoteRegion]:
    rkeys = st.one_of(st.sampled_from(world.rkeys), random_bytes()) if world.rkeys else random_bytes()
    return st.builds(
        data_pb2.RemoteRegion,
        region_id=uint(64),
        rkey=rkeys,
        shared_memory=st.one_of(st.none(), shared_memory(world)),
        address=uint(64),
        length=uint(64, world.max_value),
    )


def slots(world: World) -> st.SearchStrategy[list[data_pb2.RemoteSlot]]:
    slot = st.builds(data_pb2.RemoteSlot, address=uint(64), capacity=u64_near(world))
    return st.lists(slot, max_size=7)


def sessions(world: World) -> st.SearchStrategy[bytes]:
    live = [st.sampled_from(world.sessions)] if world.sessions else []
    return st.one_of(*live, st.just(b""), random_bytes())


def worker_addresses(world: World) -> st.SearchStrategy[bytes]:
    """Empty (no data plane), random, or a live address after bit flips and cuts."""
    if not world.worker_addresses:
        return st.one_of(st.just(b""), random_bytes())
    live = st.sampled_from(world.worker_addresses)
    return st.one_of(st.just(b""), random_bytes(), live, mutated(live, max_ops=3))


# -- well-typed requests, field by field from the descriptor ---------------------

# Strategies for fields by name (any message); the rest go by their protobuf type.
FieldStrategy = Callable[[World], st.SearchStrategy]
BY_NAME: dict[str, FieldStrategy] = {
    "namespace": namespaces,
    "tenant": names,
    "subtenant": names,
    "key": keys,
    "keys": key_lists,
    "prefix": lambda w: st.one_of(st.just(b""), keys(w)),
    "start_after": lambda w: st.one_of(st.just(b""), keys(w)),
    "value": values,
    "blocks": lambda w: st.lists(block_writes(w), max_size=5),
    "region": lambda w: weighted((2, st.none()), (1, remote_regions(w))),
    "slots": slots,
    "session": sessions,
    "previous_session": sessions,
    "worker_address": worker_addresses,
    "rkey": lambda w: st.sampled_from(w.rkeys) if w.rkeys else random_bytes(),
    "limit": lambda w: uint(32, LIST_LIMIT, 1000),
    "replicas": lambda w: uint(32, 3),
    "write_quorum": lambda w: uint(32, 3),
    "durability": lambda w: weighted((4, st.sampled_from([0, 1, 2, 3])), (1, sint(32))),
}

SCALARS: dict[int, Callable[[], st.SearchStrategy]] = {
    FieldDescriptor.TYPE_UINT64: lambda: uint(64),
    FieldDescriptor.TYPE_FIXED64: lambda: uint(64),
    FieldDescriptor.TYPE_UINT32: lambda: uint(32),
    FieldDescriptor.TYPE_FIXED32: lambda: uint(32),
    FieldDescriptor.TYPE_INT64: lambda: sint(64),
    FieldDescriptor.TYPE_SINT64: lambda: sint(64),
    FieldDescriptor.TYPE_SFIXED64: lambda: sint(64),
    FieldDescriptor.TYPE_INT32: lambda: sint(32),
    FieldDescriptor.TYPE_SINT32: lambda: sint(32),
    FieldDescriptor.TYPE_SFIXED32: lambda: sint(32),
    FieldDescriptor.TYPE_ENUM: lambda: sint(32),  # proto3 enums are open: any int32 parses
    FieldDescriptor.TYPE_BOOL: st.booleans,
    FieldDescriptor.TYPE_DOUBLE: doubles,
    FieldDescriptor.TYPE_FLOAT: lambda: st.floats(width=32, allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_STRING: hostile_text,
    FieldDescriptor.TYPE_BYTES: random_bytes,
}


def field_values(field: FieldDescriptor, world: World, depth: int) -> st.SearchStrategy:
    named = BY_NAME.get(field.name)
    if named is not None:
        return named(world)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        one = message_of(GetMessageClass(field.message_type), world, depth + 1)
    else:
        one = SCALARS[field.type]()
    return st.lists(one, max_size=4) if field.is_repeated else one


def message_of(cls: type, world: World, depth: int = 0) -> st.SearchStrategy:
    """Messages of ``cls`` with each field absent or set to a hostile or valid value."""
    if depth > 3:
        return st.builds(cls)
    fields = {f.name: field_values(f, world, depth) for f in cls.DESCRIPTOR.fields}
    # Fields with a strategy of their own are always drawn (it decides when they are
    # absent or empty); the others are left out about half the time.
    named = {name: fields.pop(name) for name in list(fields) if name in BY_NAME}

    def build(values: dict):
        message = cls()
        for name, value in values.items():
            if value is None:
                continue  # an optional message field left unset
            field = cls.DESCRIPTOR.fields_by_name[name]
            if field.is_repeated:
                getattr(message, name).extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(named, optional=fields).map(build)


def requests(service: str, method: str, world: World) -> st.SearchStrategy:
    """Well-typed requests of one RPC."""
    request_type = ALL_TYPES[service, method][0]
    strategy = message_of(request_type, world)
    if (service, method) == ("Data", "Get"):
        # A zero-copy get wants one slot per key: make that the common case.
        strategy = st.one_of(strategy, strategy.flatmap(lambda m: _matching_slots(m, world)))
    return strategy


def _matching_slots(message: data_pb2.GetRequest, world: World) -> st.SearchStrategy:
    def fill(slot_list):
        copy = data_pb2.GetRequest()
        copy.CopyFrom(message)
        del copy.slots[:]
        copy.slots.extend(slot_list)
        return copy

    slot = st.builds(data_pb2.RemoteSlot, address=uint(64), capacity=u64_near(world))
    n = min(len(message.keys), 8)
    return st.lists(slot, min_size=n, max_size=n).map(fill)


def routing_metadata(world: World) -> st.SearchStrategy[tuple]:
    """The ``kvstore-epoch`` metadata of a Data call: absent, right, wrong or not a number."""
    right = [st.sampled_from([str(e) for e in world.epochs])] if world.epochs else []
    value = st.one_of(
        *right,
        uint(64).map(str),
        st.sampled_from(["", "-1", " 7 ", "1_000", "0x10", "1e3", "9" * 5000, "nan"]),
        st.text(string.ascii_letters + string.digits + " -_.", max_size=20),
    )
    return st.one_of(st.just(()), value.map(lambda v: (("kvstore-epoch", v),)))


# -- raw bytes ---------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits, n = n & 0x7F, n >> 7
        out.append(bits | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_fields() -> st.SearchStrategy[bytes]:
    """One protobuf field of any number and wire type, well-formed or not."""
    number = st.one_of(st.integers(1, 20), st.sampled_from([0, 19000, 19999, (1 << 29) - 1, 1 << 29, 1 << 32]))
    wire = st.integers(0, 7)  # 3/4 are groups, 6/7 do not exist
    payload = st.one_of(
        uint(64).map(varint),
        st.just(b"\xff" * 10 + b"\x01"),  # an 11-byte varint (past 64 bits)
        st.just(b"\x80" * 12),  # a varint that never ends
        st.binary(max_size=16).map(lambda b: varint(len(b)) + b),
        st.tuples(uint(32), st.binary(max_size=8)).map(lambda t: varint(t[0]) + t[1]),  # length past the end
        st.binary(min_size=4, max_size=8),
    )
    return st.tuples(number, wire, payload).map(lambda t: varint(t[0] << 3 | t[1]) + t[2])


def mutation_ops(max_ops: int = 6) -> st.SearchStrategy[list[tuple]]:
    position = st.integers(0, 1 << 16)
    op = st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("set"), position, st.integers(0, 255)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=12)),
        st.tuples(st.just("delete"), position, st.integers(1, 16)),
        st.tuples(st.just("truncate"), position),
        st.tuples(st.just("duplicate"), position, st.integers(1, 64)),
        st.tuples(st.just("field"), position, raw_fields()),
    )
    # Half the time a single mutation: more of the results still parse, and reach the handlers.
    return st.one_of(st.lists(op, min_size=1, max_size=1), st.lists(op, min_size=1, max_size=max_ops))


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    """``data`` after ``ops`` (positions wrap around its length)."""
    out = bytearray(data)
    for name, at, *args in ops:
        at = at % (len(out) + 1)
        if name == "flip" and out:
            out[at % len(out)] ^= 1 << args[0]
        elif name == "set" and out:
            out[at % len(out)] = args[0]
        elif name in ("insert", "field"):
            out[at:at] = args[0]
        elif name == "delete":
            del out[at : at + args[0]]
        elif name == "truncate":
            del out[at:]
        elif name == "duplicate":
            out[at:at] = out[at : at + args[0]]
    return bytes(out)


def mutated(base: st.SearchStrategy[bytes], max_ops: int = 6) -> st.SearchStrategy[bytes]:
    return st.tuples(base, mutation_ops(max_ops)).map(lambda t: mutate(*t))


def mutated_requests(service: str, method: str, world: World) -> st.SearchStrategy[bytes]:
    """Serialized requests of one RPC after random mutations (and plain noise now and then)."""
    serialized = requests(service, method, world).map(lambda m: m.SerializeToString())
    return weighted((9, mutated(serialized)), (1, st.binary(max_size=200)))
