"""Fuzz the data plane's inputs against a daemon subprocess: Hello's worker
address, and zero-copy Put and Get with a live session.

What could take the daemon down lives here: UCX unpacks worker addresses and
remote keys it is handed, and the daemon maps the shared memory a descriptor
names. So the daemon is a subprocess (``proc_daemon``): after every case it
must still run (a crash is a FINDING, and the daemon is restarted so that
hypothesis can shrink the case), and over every test it must pass the
``watched`` checks (conftest.py: SERVING and a round trip afterwards, no
INTERNAL counted, no exception logged, RSS and open fds bounded).

The client side is real: a UCX worker in this process (its live address for
Hello, mutated too), memory registered for RMA with an inaccessible guard page
on each side, and a sealed memfd (kvstore._native.shared_memory) for the
shared-memory path. Zero-copy requests name a live session most of the time
(else: empty, random, or a stale one), and regions that are honest, a part of
the real one, or hostile (address and length edges, wrapping ranges, another
region's rkey, mutated rkeys - including ones re-framed with a valid checksum,
which UCX then parses - and SharedMemory descriptors with wrong pid, fd,
token, length or address), sent over gRPC and over the local channel (where
the daemon knows this process by its peer credentials and may map the memfd).

A get that finds a block writes into this process. So gets of stored blocks
only name regions inside the guarded buffer (or the memfd, which the daemon
maps and copies into itself); hostile regions and re-framed rkeys go with
absent keys or with puts (reads). Whatever an OK reply says was written or
stored is checked byte for byte.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import random
import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import strategies as st

from kvstore._proto.v1 import cluster_pb2, data_pb2
from kvstore.checksum import checksum
from tests.fuzz.strategies import (
    U64,
    World,
    hostile_text,
    keys,
    message_of,
    mutate,
    mutation_ops,
    random_bytes,
    uint,
    weighted,
)
from tests.fuzz.support import (
    FORMS,
    LocalSocket,
    Outcome,
    S,
    call,
    describe,
    examples,
    open_fds,
    rss_bytes,
    run_cases,
    verdict,
)

try:
    from kvstore import _native
    from kvstore._native.shared_memory import SharedMemory
except ImportError:  # pragma: no cover
    _native = None

PAGE = mmap.PAGESIZE
BUFFER_BYTES = 1 << 20
STORED_SIZES = [1, 17, 4096, 65536, 300_000]  # blocks gets may find
LIVE = "<live session>"  # stands for the session of the moment (a failed transfer ends it)
HONEST_REGION_ID = 1  # only honest shared-memory descriptors use it (the daemon caches a mapping per id)


class GuardedBuffer:
    """Registered memory with an inaccessible page on each side, so that a transfer
    that strays past it fails (EFAULT) instead of touching this process."""

    def __init__(self, context, size: int) -> None:
        self.map = mmap.mmap(-1, size + 2 * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for guard in (base, base + PAGE + size):
            assert libc.mprotect(guard, PAGE, 0) == 0, os.strerror(ctypes.get_errno())  # PROT_NONE
        self.view = memoryview(self.map)[PAGE : PAGE + size]
        self.view[:] = random.Random(1).randbytes(size)
        self.handle = context.register(self.view)
        self.address, self.length, self.rkey = self.handle.address, size, self.handle.packed_rkey


@dataclass
class Client:
    """This process as a zero-copy client of ``proc_daemon``."""

    proc: object
    context: object
    worker: object
    guarded: GuardedBuffer
    shm: object  # SharedMemory
    shm_handle: object
    local_name: str = ""
    session: bytes = b""
    stale_sessions: list = field(default_factory=list)
    ns: data_pb2.Namespace = None
    stored: dict = field(default_factory=dict)  # key -> value of the blocks gets may find
    _local: LocalSocket | None = None

    @property
    def shm_address(self) -> int:
        return self.shm_handle.address

    def hello(self) -> None:
        """A session of our own (again: failed transfers and hostile Hellos end it)."""
        request = cluster_pb2.HelloRequest(
            client_id="fuzz-zero-copy", worker_address=self.worker.address, previous_session=self.session
        )
        raw = self.proc.channel.unary_unary("/kvstore.v1.Cluster/Hello")(request.SerializeToString(), timeout=30)
        reply = cluster_pb2.HelloResponse.FromString(raw)
        assert reply.data_plane and reply.session, reply
        if self.session:
            self.stale_sessions.append(self.session)
        self.session, self.local_name = reply.session, reply.local_socket
        self.reconnect()

    def reconnect(self) -> None:
        if self._local is not None:
            self._local.close()
        self._local = LocalSocket(self.local_name)

    def send(self, transport: str, method: str, payload: bytes) -> Outcome:
        if transport == "grpc":
            return call(self.proc.channel, "Data", method, payload)
        outcome = self._local.call(method, payload)
        if outcome.code == S.UNAVAILABLE and outcome.detail is None:
            self.reconnect()  # the daemon closed the socket (or died: the caller checks)
        return outcome

    def resolve(self, address: int, length: int) -> memoryview | None:
        """Our bytes at ``address`` (in the guarded buffer or the memfd), if all there."""
        for base, view in ((self.guarded.address, self.guarded.view), (self.shm_address, self.shm.buffer)):
            offset = address - base
            if 0 <= offset and offset + length <= len(view):
                return memoryview(view)[offset : offset + length]
        return None


@pytest.fixture(scope="module")
def client(proc_daemon):
    context = _native.Context(None)
    worker = _native.Worker(context)
    guarded = GuardedBuffer(context, BUFFER_BYTES)
    shm = SharedMemory.create(BUFFER_BYTES)
    shm.buffer[:] = random.Random(2).randbytes(BUFFER_BYTES)
    c = Client(proc_daemon, context, worker, guarded, shm, context.register(shm.buffer))
    c.ns = data_pb2.Namespace(tenant="zc-" + uuid.uuid4().hex[:10], subtenant="s")
    rng = random.Random(3)
    c.stored = {b"g%d" % i: rng.randbytes(n) for i, n in enumerate(STORED_SIZES)}
    blocks = [data_pb2.BlockWrite(key=k, value=v, length=len(v), checksum=checksum(v)) for k, v in c.stored.items()]
    put = data_pb2.PutRequest(namespace=c.ns, blocks=blocks)
    assert call(proc_daemon.channel, "Data", "Put", put.SerializeToString()).code == S.OK
    c.hello()
    yield c
    if c._local is not None:
        c._local.close()
    for resource in (c.shm_handle, guarded.handle, shm, worker):
        try:
            resource.close()
        except Exception:
            pass


def judge(proc, where: str, method: str, payload: bytes, outcome: Outcome, service: str = "Data") -> None:
    """The verdict on one reply, after checking that the daemon survived it."""
    # A crash shows as UNAVAILABLE without detail first; give the exit a moment to be seen.
    if proc.dead(wait=2.0 if outcome.code == S.UNAVAILABLE and outcome.detail is None else 0.0):
        log = proc.proc.log_tail(25)
        proc.revive()
        proc.deaths.clear()  # this case is reported here, with its request
        raise AssertionError(f"FINDING: the daemon died ({where}) on\n  {describe(service, method, payload)}\n{log}")
    verdict(service, method, payload, outcome)


# -- Hello -----------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_hello(form, watched, client):
    """Hello with live, mutated and random worker addresses and sessions (UCX parses them)."""
    world = World(
        max_value=1 << 20,
        namespaces=[client.ns],
        keys=[b"k"],
        sessions=[client.session],
        worker_addresses=[client.worker.address],
    )
    strategy = message_of(cluster_pb2.HelloRequest, world)

    def check(request):
        payload = request.SerializeToString()
        judge(watched, "Hello", "Hello", payload, call(watched.channel, "Cluster", "Hello", payload), service="Cluster")

    run_cases(strategy, check, examples("hello", form))
    client.hello()  # a Hello naming our session as its previous one ended it


# -- zero-copy requests -------------------------------------------------------------


def rkey_choices(c: Client, reframed: bool) -> st.SearchStrategy[bytes]:
    """Valid rkeys (ours, also of the other buffer), broken ones, and - when the request
    only reads from this process - rkeys whose UCX bytes were mutated and re-framed
    with a valid length and checksum, so that they reach UCX's parser."""
    valid = st.sampled_from([c.guarded.rkey, c.shm_handle.packed_rkey])
    broken = st.one_of(st.just(b""), random_bytes(), st.tuples(valid, mutation_ops(3)).map(lambda t: mutate(*t)))
    choices = [(6, valid), (3, broken)]
    if reframed:
        choices.append((2, st.tuples(valid, mutation_ops(3)).map(lambda t: _reframe(mutate(t[0][16:], t[1])))))
        choices.append((2, ucx_rkeys()))
    return weighted(*choices)


def _reframe(raw: bytes) -> bytes:
    return _native._frame_rkey(raw)


@st.composite
def ucx_rkeys(draw) -> bytes:
    """Remote keys laid out as UCX's parser expects (a map of memory domains, a memory
    type, then a sized entry per domain: what the native layout check lets through),
    with random contents, framed with a valid checksum: UCX itself unpacks them."""
    md_map = draw(weighted((3, st.integers(0, 0xFF)), (1, st.integers(0, 0xFFFF)), (1, st.sampled_from([1 << 63, U64]))))
    raw = md_map.to_bytes(8, "little") + bytes([draw(st.integers(0, 9))])
    for _ in range(bin(md_map).count("1")):
        entry = draw(st.binary(max_size=40))
        raw += bytes([len(entry)]) + entry
    return _reframe(raw + draw(st.binary(max_size=16)))  # trailing device info, which UCX does not read


def claims(c: Client, safe: bool) -> st.SearchStrategy[tuple[int, int]]:
    """(address, length) a region claims: the guarded buffer or a part of it; unless
    ``safe``, also the memfd, ranges past either, and address-space edges."""
    g = c.guarded
    inside = st.tuples(st.integers(0, g.length - 1), st.integers(1, g.length)).map(
        lambda t: (g.address + t[0], min(t[1], g.length - t[0]))
    )
    choices = [(4, st.just((g.address, g.length))), (2, inside)]
    if not safe:
        hostile = st.sampled_from(
            [
                (0, 0), (0, 1), (g.address, 0), (g.address - PAGE, g.length + 2 * PAGE), (g.address, g.length + 1),
                (g.address + g.length, 4096), (U64, 1), (U64 - 100, 200), (g.address, U64), (1 << 63, 1 << 63),
            ]
        )
        choices += [(2, st.just((c.shm_address, BUFFER_BYTES))), (3, hostile), (1, st.tuples(uint(64), uint(64)))]
    return weighted(*choices)


def descriptors(c: Client) -> st.SearchStrategy[tuple[str, data_pb2.SharedMemory | None]]:
    """(kind, SharedMemory): none, honest (the memfd as it is), misplaced (a wrong
    address: the daemon would copy at another place of the memfd) or broken
    (a wrong pid, fd, token or length: the daemon cannot map it)."""
    pid, fd, token, length = c.shm.descriptor
    honest = dict(pid=pid, fd=fd, token=token, length=length, address=c.shm_address)

    def make(kind, change, omitted):
        fields = {**honest, **change, "checksums_omitted": omitted}
        return kind, data_pb2.SharedMemory(**fields)

    broken = st.one_of(
        st.builds(dict, pid=st.one_of(st.sampled_from([0, 1, c.proc.pid, pid + 1]), uint(32))),
        st.builds(dict, fd=st.one_of(st.sampled_from([0, 1, 2, fd + 1]), uint(32))),
        st.builds(dict, token=st.one_of(st.text("0123456789abcdef", min_size=32, max_size=32), hostile_text())),
        st.builds(dict, length=st.one_of(st.sampled_from([0, length - 1, length + 1, 1 << 40]), uint(64))),
    ).filter(lambda change: any(honest[k] != v for k, v in change.items()))
    misplaced = st.builds(dict, address=uint(64)).filter(lambda change: change["address"] != c.shm_address)
    return weighted(
        (3, st.just(("none", None))),
        (3, st.tuples(st.just("honest"), st.just({}), st.booleans())),
        (2, st.tuples(st.just("broken"), broken, st.booleans())),
        (1, st.tuples(st.just("misplaced"), misplaced, st.booleans())),
    ).map(lambda t: t if t[0] == "none" else make(*t))


@dataclass
class ZeroCopy:
    """One zero-copy request, as drawn (the request is built from it at send time)."""

    method: str
    transport: str
    session: object  # LIVE, or bytes
    region_id: int
    claim: tuple[int, int]
    rkey: bytes
    shared: tuple
    entries: list  # Put: (key, address, length, value, checksum or None); Get: (key, address, capacity)
    durability: int = 0
    slot_skew: int = 0  # Get: slots beyond (or short of) one per key


def sessions_of(c: Client) -> st.SearchStrategy:
    stale = [st.sampled_from(c.stale_sessions)] if c.stale_sessions else []
    return weighted((12, st.just(LIVE)), (1, st.just(b"")), (1, random_bytes()), *[(1, s) for s in stale])


def addresses(c: Client, safe: bool) -> st.SearchStrategy[int]:
    """Where a block lies in our memory: inside either buffer, at their edges, or anywhere."""
    g, s = c.guarded, c.shm_address
    inside = st.one_of(
        st.integers(g.address, g.address + g.length - 1), st.integers(s, s + BUFFER_BYTES - 1)
    )
    edges = st.sampled_from([g.address - 1, g.address + g.length - 1, g.address + g.length, s + BUFFER_BYTES, 0, U64])
    return weighted((6, inside), (2, edges), (0 if safe else 1, uint(64)))


def lengths() -> st.SearchStrategy[int]:
    return weighted(
        (6, st.integers(0, 8192)),
        (2, st.sampled_from([BUFFER_BYTES - 1, BUFFER_BYTES, BUFFER_BYTES + 1, 64 << 20, (256 << 20) + 1])),
        (1, uint(64)),
    )


def zero_copy_puts(c: Client) -> st.SearchStrategy[ZeroCopy]:
    entry = st.tuples(
        weighted((4, st.sampled_from([b"p%d" % i for i in range(6)])), (1, keys(World(1, [c.ns], [b"p0"])))),
        addresses(c, safe=False),
        lengths(),
        weighted((8, st.just(b"")), (1, st.binary(min_size=1, max_size=8))),  # a value in a zero-copy put is refused
        weighted((6, st.none()), (2, uint(64))),  # None: the right checksum of our bytes there
    )
    return st.builds(
        ZeroCopy,
        method=st.just("Put"),
        transport=st.sampled_from(["grpc", "local"]),
        session=sessions_of(c),
        region_id=weighted((3, st.just(HONEST_REGION_ID)), (2, st.integers(2, 6)), (1, uint(64))),
        claim=claims(c, safe=False),
        rkey=rkey_choices(c, reframed=True),
        shared=descriptors(c),
        entries=st.lists(entry, max_size=5),
        durability=weighted((6, st.sampled_from([0, 1, 2])), (1, st.sampled_from([3, 4, -1]))),
    )


def zero_copy_gets(c: Client) -> st.SearchStrategy[ZeroCopy]:
    @st.composite
    def build(draw):
        finds = draw(st.booleans())  # stored keys: only into regions inside our guarded buffer
        stored = list(c.stored) + [b"absent"]
        key = st.sampled_from(stored) if finds else st.sampled_from([b"absent-%d" % i for i in range(3)])
        entry = st.tuples(key, addresses(c, safe=finds), weighted((5, st.integers(0, 400_000)), (1, uint(64))))
        entries = draw(st.lists(entry, max_size=6))
        return ZeroCopy(
            method="Get",
            transport=draw(st.sampled_from(["grpc", "local"])),
            session=draw(sessions_of(c)),
            region_id=draw(weighted((3, st.just(HONEST_REGION_ID)), (2, st.integers(2, 6)))),
            claim=draw(claims(c, safe=finds)),
            rkey=draw(rkey_choices(c, reframed=not finds)),
            shared=draw(descriptors(c)),
            entries=entries,
            slot_skew=draw(weighted((8, st.just(0)), (1, st.just(-1)), (1, st.just(1)))),
        )

    return build()


def build_request(c: Client, case: ZeroCopy):
    kind, shm = case.shared
    region_id = case.region_id
    if kind == "honest":
        region_id = HONEST_REGION_ID
    elif kind == "misplaced":
        region_id = 2 + region_id % 6  # mappable: few ids, so that few mappings are held (FDS_PER_SESSION)
    elif region_id == HONEST_REGION_ID and kind != "none":
        region_id = 8  # keep the honest mapping's cache entry honest
    region = data_pb2.RemoteRegion(region_id=region_id, rkey=case.rkey, address=case.claim[0], length=case.claim[1])
    if shm is not None:
        region.shared_memory.CopyFrom(shm)
    session = c.session if case.session == LIVE else case.session
    if case.method == "Put":
        blocks = []
        for key, address, length, value, sum_ in case.entries:
            if sum_ is None:
                ours = c.resolve(address, length) if length <= BUFFER_BYTES else None
                sum_ = checksum(ours) if ours is not None else 0
            blocks.append(
                data_pb2.BlockWrite(key=key, value=value, length=length, checksum=sum_, remote_address=address)
            )
        return data_pb2.PutRequest(
            namespace=c.ns, blocks=blocks, region=region, session=session, client_id="fuzz", durability=case.durability
        )
    return data_pb2.GetRequest(
        namespace=c.ns,
        keys=[key for key, _, _ in case.entries],
        slots=[data_pb2.RemoteSlot(address=a, capacity=n) for _, a, n in case.entries][: len(case.entries) + case.slot_skew]
        + [data_pb2.RemoteSlot(address=c.guarded.address, capacity=1)] * max(0, case.slot_skew),
        region=region,
        session=session,
        client_id="fuzz",
    )


def where_bytes_go(c: Client, case: ZeroCopy) -> bool:
    """Whether the bytes of this request move where we can check them: by RMA at the
    addresses named, or through the memfd mapped at its real address."""
    kind = case.shared[0]
    if kind == "misplaced" and case.transport == "local":
        return False  # mapped, but copied relative to a wrong address
    return True


def sent(c: Client, proc, case: ZeroCopy, request) -> Outcome:
    payload = request.SerializeToString()
    outcome = c.send(case.transport, case.method, payload)
    judge(proc, f"zero-copy {case.method} over {case.transport}", case.method, payload, outcome)
    if case.session == LIVE and outcome.detail is not None and outcome.detail.code in (113, 204):
        c.hello()  # UNKNOWN_CLIENT, TRANSFER_FAILED: our session ended (as designed): the next case needs one
    return outcome


@pytest.mark.parametrize("form", FORMS)
def test_zero_copy_put(form, watched, client):
    def check(case: ZeroCopy):
        watched.revive() and client.hello()
        request = build_request(client, case)
        outcome = sent(client, watched, case, request)
        if outcome.code != S.OK:
            return
        shown = describe("Data", "Put", request.SerializeToString())
        assert data_pb2.PutResponse.FromString(outcome.body).stored == len(request.blocks), shown
        if not where_bytes_go(client, case):
            return
        # What was stored is what lay at each block's address (the last block of a key wins).
        expected = {b.key: client.resolve(b.remote_address, b.length) for b in request.blocks}
        get = data_pb2.GetRequest(namespace=client.ns, keys=list(expected))
        read = call(watched.channel, "Data", "Get", get.SerializeToString())
        assert read.code == S.OK, f"FINDING: reading back a zero-copy put: {read}; {shown}"
        got = data_pb2.GetResponse.FromString(read.body)
        for (key, ours), result in zip(expected.items(), got.results):
            assert result.found, f"FINDING: stored {key!r} is not found afterwards; {shown}"
            if ours is not None:
                assert result.value == bytes(ours), f"FINDING: {key!r} holds other bytes than were at its address; {shown}"

    run_cases(zero_copy_puts(client), check, examples("zero-copy-put", form))


@pytest.mark.parametrize("form", FORMS)
def test_zero_copy_get(form, watched, client):
    def check(case: ZeroCopy):
        watched.revive() and client.hello()
        request = build_request(client, case)
        for _, address, capacity in case.entries:  # clear the slots: stale bytes must not pass for a copy
            target = client.resolve(address, min(capacity, BUFFER_BYTES))
            if target is not None:
                target[:] = bytes(len(target))
        outcome = sent(client, watched, case, request)
        if outcome.code != S.OK:
            return
        shown = describe("Data", "Get", request.SerializeToString())
        results = data_pb2.GetResponse.FromString(outcome.body).results
        assert len(results) == len(request.keys), f"FINDING: {len(results)} results; {shown}"
        written = []
        for (key, address, capacity), result in zip(case.entries, results):
            value = client.stored.get(key)
            assert result.found == (value is not None), f"FINDING: found={result.found} for {key!r}; {shown}"
            if value is None:
                continue
            assert (result.length, result.checksum) == (len(value), checksum(value)), f"FINDING: {key!r}; {shown}"
            assert result.too_small == (len(value) > capacity), f"FINDING: too_small wrong for {key!r}; {shown}"
            if not result.too_small:
                written.append((address, value))
        spans = sorted((a, a + len(v)) for a, v in written)
        overlapping = any(x[1] > y[0] for x, y in zip(spans, spans[1:]))
        if where_bytes_go(client, case) and not overlapping:
            for address, value in written:
                ours = client.resolve(address, len(value))
                assert ours is not None and bytes(ours) == value, (
                    f"FINDING: the block written at {address:#x} is not the stored one; {shown}"
                )

    run_cases(zero_copy_gets(client), check, examples("zero-copy-get", form))


# -- regressions of what the fuzz found -----------------------------------------------


def _other_session(c: Client, client_id: str) -> bytes:
    request = cluster_pb2.HelloRequest(client_id=client_id, worker_address=c.worker.address)
    raw = c.proc.channel.unary_unary("/kvstore.v1.Cluster/Hello")(request.SerializeToString(), timeout=30)
    return cluster_pb2.HelloResponse.FromString(raw).session


def _end_session(c: Client, client_id: str, session: bytes) -> None:
    """A Hello naming ``session`` as its previous one: the daemon drops it (and unmaps its memory)."""
    request = cluster_pb2.HelloRequest(client_id=client_id, worker_address=c.worker.address, previous_session=session)
    c.proc.channel.unary_unary("/kvstore.v1.Cluster/Hello")(request.SerializeToString(), timeout=30)


SPARSE_BYTES = 128 << 20


def test_a_refused_put_does_not_fault_in_a_sparse_memfd(proc_daemon, client):
    """Regression (fuzz): the daemon mapped a client's whole memfd with MAP_POPULATE before any block was checked, so one refused 1-byte put naming a sparse 2 GiB memfd made it allocate 2 GiB."""
    token = os.urandom(16).hex()
    fd = os.memfd_create("kvstore-" + token, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    session = _other_session(client, "fuzz-sparse")
    try:
        os.ftruncate(fd, SPARSE_BYTES)  # never touched here: no page of it exists yet
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        region = data_pb2.RemoteRegion(
            region_id=1,
            shared_memory=data_pb2.SharedMemory(pid=os.getpid(), fd=fd, token=token, length=SPARSE_BYTES, address=1 << 40),
        )
        # One byte, with a wrong checksum: the daemon refuses it.
        request = data_pb2.PutRequest(
            namespace=client.ns, session=session, region=region,
            blocks=[data_pb2.BlockWrite(key=b"sparse", length=1, checksum=0, remote_address=1 << 40)],
        )
        before = rss_bytes(proc_daemon.pid)
        with LocalSocket(client.local_name) as local:
            outcome = local.call("Put", request.SerializeToString())
        grown = rss_bytes(proc_daemon.pid) - before
        assert outcome.code == S.INVALID_ARGUMENT, outcome
        shown = describe("Data", "Put", request.SerializeToString())
        assert grown < 16 << 20, f"a refused 1-byte put grew the daemon's RSS by {grown >> 20} MiB:\n  {shown}"
    finally:
        _end_session(client, "fuzz-sparse", session)
        os.close(fd)


def test_one_memfd_under_many_region_ids_is_mapped_once(proc_daemon, client):
    """Regression (fuzz): a memfd was mapped again (and its fd dup'ed) for every region_id a request named, 64 per session."""
    session = _other_session(client, "fuzz-many-ids")
    pid, fd, token, length = client.shm.descriptor
    descriptor = data_pb2.SharedMemory(pid=pid, fd=fd, token=token, length=length, address=client.shm_address)
    value = bytes(client.shm.buffer[:16])
    try:
        fds, rss = open_fds(proc_daemon.pid), rss_bytes(proc_daemon.pid)
        with LocalSocket(client.local_name) as local:
            for region_id in range(100, 164):
                region = data_pb2.RemoteRegion(
                    region_id=region_id, rkey=client.shm_handle.packed_rkey, address=client.shm_address,
                    length=length, shared_memory=descriptor,
                )
                request = data_pb2.PutRequest(
                    namespace=client.ns, session=session, region=region,
                    blocks=[
                        data_pb2.BlockWrite(
                            key=b"ids", length=16, checksum=checksum(value), remote_address=client.shm_address
                        )
                    ],
                )
                assert local.call("Put", request.SerializeToString()).code == S.OK
        more_fds, grown = open_fds(proc_daemon.pid) - fds, rss_bytes(proc_daemon.pid) - rss
        assert more_fds < 8 and grown < 16 << 20, (
            f"64 puts naming one {length >> 20} MiB memfd under 64 region ids: +{more_fds} fds, +{grown >> 20} MiB RSS"
        )
    finally:
        _end_session(client, "fuzz-many-ids", session)



def test_a_truncated_worker_address_is_not_retryable(proc_daemon, client):
    """Regression (fuzz): some truncated worker addresses passed the address check, then failed the daemon's own connect as UNAVAILABLE (retried by clients) instead of INVALID_ARGUMENT (INVALID_WORKER_ADDRESS)."""
    live = client.worker.address
    for _ in range(2):
        for length in range(len(live) // 2, len(live)):  # the fuzz's shrunk case is one of these
            request = cluster_pb2.HelloRequest(client_id="fuzz-hello-cut", worker_address=live[:length])
            outcome = call(proc_daemon.channel, "Cluster", "Hello", request.SerializeToString())
            assert outcome.code != S.UNAVAILABLE, (
                f"Hello with the live worker address cut to {length} of {len(live)} bytes: {outcome.code.name} "
                f"{outcome.details!r}\n  " + describe("Cluster", "Hello", request.SerializeToString())
            )
    assert not proc_daemon.dead()
