"""The local channel: co-located clients send Data calls over the daemon's Unix
socket instead of gRPC, with the same results, errors, limits and fallbacks."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading

import pytest

from kvstore import errors
from kvstore._proto.v1 import data_pb2
from kvstore.checksum import checksum
from kvstore.client import Client
from kvstore.client.config import ClientConfig
from kvstore.protocol.local_channel import NO_EPOCH, PREAMBLE, REQUEST, RESPONSE, socket_address
from kvstore.server.config import ServerConfig
from kvstore.server.daemon import Daemon
from tests.conftest import wait_for

try:
    from kvstore import _native

    NATIVE = _native.available()
except ImportError:
    NATIVE = False

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(not NATIVE, reason="no native data plane")]

KIB = 4096


def conn_of(kv: Client):
    (conn,) = kv._nodes.connections.values()
    return conn


def node_of(kv: Client) -> str:
    (node,) = kv._maps.view.nodes
    return node


async def failure(kv: Client, method: str, request) -> errors.KVStoreError:
    """The error one raw Data call fails with (past the SDK's own checks)."""
    with pytest.raises(errors.KVStoreError) as info:
        await kv._maps.call(node_of(kv), "data", method, request, 5)
    return info.value


@pytest.fixture
async def own_daemon(tmp_path):
    """Daemons on this test's event loop, so a test can reach into their handlers."""
    started: list[Daemon] = []

    async def make(local_channel: bool = True, **settings) -> Daemon:
        config = ServerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / f"d{len(started)}"), memory=32 << 20, **settings)
        daemon = Daemon(config)
        daemon.local_channel = local_channel
        started.append(daemon)
        return await daemon.start()

    yield make
    for daemon in started:
        await daemon.stop(grace=0)


def hold(daemon: Daemon, method: str, seconds: float):
    """Make ``method`` take ``seconds`` longer, on both transports (the shared seam)."""
    seam = daemon.local.methods[method]
    original = seam.handler
    state = {"started": 0, "cancelled": 0}

    async def slow(request, context):
        state["started"] += 1
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            state["cancelled"] += 1
            raise
        return await original(request, context)

    seam.handler = slow
    return state


async def test_zero_copy_calls_go_over_the_local_channel(daemon, tenant):
    async with Client(daemon.address, tenant=tenant, transport="ucx", ucx_tls="shm,tcp") as kv:
        keys = [b"k%d" % i for i in range(32)]
        with kv.allocate(64 * KIB) as src, kv.allocate(64 * KIB + 3) as dst:
            data = os.urandom(32 * KIB - 5)
            src.buffer[: len(data)] = data
            offsets = [i * 1000 for i in range(32)]
            sizes = [1000] * 31 + [len(data) - offsets[31]]
            assert await kv.put_from(keys, src, offsets, sizes) == 32
            local = conn_of(kv).local
            assert local is not None and local.calls >= 1
            before = local.calls
            got = await kv.get_into(keys + [b"absent"], dst, [o + 3 for o in offsets] + [0], sizes + [16])
            assert got == sizes + [None]
            assert bytes(dst.buffer[3 : 3 + len(data)]) == data
            assert local.calls > before

            assert await kv.exists([b"k0", b"absent", b"k31"]) == [True, False, True]
            assert await kv.lookup_prefix([b"k0", b"k1", b"absent", b"k2"]) == 2
            listed = await kv.list(b"k1")
            assert sorted(k for k, _ in listed) == sorted(k for k in keys if k.startswith(b"k1"))
            assert (await kv.stat())["blocks"] == 32
            assert await kv.delete(keys[:10]) == 10
            assert await kv.exists(keys[:11]) == [False] * 10 + [True]
            assert await kv.get(b"k11") == data[offsets[11] : offsets[11] + sizes[11]]
            assert conn_of(kv).local is local and not local.closed
            assert local.calls >= before + 8


async def test_large_inline_values_cross_in_many_reads(daemon, tenant):
    """Frames much larger than one socket read, both ways."""
    async with Client(daemon.address, tenant=tenant, transport="inline") as kv:
        values = {b"big%d" % i: os.urandom((8 << 20) + i) for i in range(3)}
        await kv.put_many(values)
        assert await kv.get_many(list(values)) == list(values.values())
        assert conn_of(kv).local is not None and conn_of(kv).local.calls >= 2


async def test_errors_are_the_same_as_over_grpc(daemon, tenant):
    ns = data_pb2.Namespace(tenant=tenant, subtenant="default")
    limit = daemon.config.max_value_size

    def region_put(kv: Client, region, length: int, wrong_checksum: bool) -> data_pb2.PutRequest:
        value = bytes(region.buffer[:length])
        return data_pb2.PutRequest(
            namespace=ns,
            client_id=kv.client_id,
            region=region.wire(),
            blocks=[
                data_pb2.BlockWrite(key=b"fine", length=1, checksum=checksum(value[:1]), remote_address=region.address),
                data_pb2.BlockWrite(
                    key=b"r", length=length, checksum=checksum(value) ^ wrong_checksum, remote_address=region.address
                ),
            ],
        )

    cases = [
        ("Exists", lambda kv, r: data_pb2.KeysRequest(namespace=ns, keys=[b"ok", b""])),  # empty key, index 1
        ("Exists", lambda kv, r: data_pb2.KeysRequest(namespace=ns, keys=[b"ok", b"k" * 5000])),  # key too large
        ("Exists", lambda kv, r: data_pb2.KeysRequest(keys=[b"ok"])),  # no namespace
        ("Put", lambda kv, r: data_pb2.PutRequest(
            namespace=ns, blocks=[data_pb2.BlockWrite(key=b"v", value=b"abc", length=3, checksum=checksum(b"abd"))]
        )),
        ("Put", lambda kv, r: data_pb2.PutRequest(
            namespace=ns, durability=99, blocks=[data_pb2.BlockWrite(key=b"v", value=b"a", length=1, checksum=checksum(b"a"))]
        )),
        ("Put", lambda kv, r: region_put(kv, r, limit + 1, False)),  # a block over the value size limit
        ("Put", lambda kv, r: region_put(kv, r, 3000, True)),  # a wrong checksum over shared memory
        ("Get", lambda kv, r: data_pb2.GetRequest(namespace=ns, keys=[b"a"], slots=[data_pb2.RemoteSlot(address=1, capacity=1)])),
    ]
    async with (
        Client(daemon.address, tenant=tenant, transport="ucx") as local,
        Client(daemon.address, tenant=tenant, transport="ucx", local_channel=False) as grpc_only,
    ):
        await local.exists([b"x"])
        await grpc_only.exists([b"x"])
        assert conn_of(local).local is not None and conn_of(grpc_only).local is None
        with local.allocate(64 * KIB) as mine, grpc_only.allocate(64 * KIB) as theirs:
            mine.buffer[:] = theirs.buffer[:] = os.urandom(64 * KIB)
            answered = conn_of(local).local.calls
            seen = []
            for method, make in cases:
                over_local = await failure(local, method, make(local, mine))
                over_grpc = await failure(grpc_only, method, make(grpc_only, theirs))
                assert type(over_local) is type(over_grpc), (method, over_local, over_grpc)
                assert (over_local.code, over_local.index, over_local.message) == (
                    over_grpc.code,
                    over_grpc.index,
                    over_grpc.message,
                )
                assert over_local.message.endswith(f" from {daemon.address}]")
                seen.append((type(over_local).__name__, over_local.code, over_local.index))
            assert conn_of(local).local.calls == answered + len(cases)
            assert conn_of(grpc_only).local is None
    assert seen[:3] == [
        ("InvalidArgumentError", "EMPTY_KEY", 1),
        ("InvalidArgumentError", "KEY_TOO_LARGE", 1),
        ("InvalidArgumentError", "INVALID_NAMESPACE", -1),
    ]
    assert seen[5] == ("InvalidArgumentError", "VALUE_TOO_LARGE", 1)
    assert seen[6][1] == "CHECKSUM_MISMATCH" and seen[6][2] == 1


async def test_a_value_over_the_limit_fails_alike(daemon, tenant):
    limit = daemon.config.max_value_size
    ns = data_pb2.Namespace(tenant=tenant, subtenant="default")
    request = data_pb2.PutRequest(namespace=ns, blocks=[data_pb2.BlockWrite(key=b"ok", checksum=checksum(b"")), data_pb2.BlockWrite(key=b"big", value=b"x", length=limit + 1)])
    async with (
        Client(daemon.address, tenant=tenant, transport="ucx") as local,
        Client(daemon.address, tenant=tenant, transport="ucx", local_channel=False) as grpc_only,
    ):
        a, b = await failure(local, "Put", request), await failure(grpc_only, "Put", request)
        assert conn_of(local).local is not None and conn_of(local).local.calls == 1
        assert (type(a), a.code, a.index, a.message) == (type(b), b.code, b.index, b.message)
        assert isinstance(a, errors.InvalidArgumentError) and a.code == "VALUE_TOO_LARGE" and a.index == 1


async def test_many_concurrent_calls_share_one_socket(own_daemon, tenant):
    d = await own_daemon()
    state = hold(d, "Exists", 0.05)  # every call stays in flight a while: they overlap
    async with Client(d.address, tenant=tenant, transport="ucx", concurrency=64) as kv:
        keys = [b"c%d" % i for i in range(200)]
        await kv.put_many({k: k * 10 for k in keys[::2]})
        local = conn_of(kv).local
        before = local.calls
        results = await asyncio.gather(*(kv.exists([k]) for k in keys))
        assert [r[0] for r in results] == [i % 2 == 0 for i in range(200)]
        assert conn_of(kv).local is local and local.calls == before + 200
        assert state["started"] == 200
        assert len(d.local.connections) == 1
        values = await asyncio.gather(*(kv.get(k) for k in keys[:50]))
        assert values == [k * 10 if i % 2 == 0 else None for i, k in enumerate(keys[:50])]


def read_frames(sock: socket.socket) -> list[tuple[int, int, bytes]]:
    """Every response frame until the daemon closes the connection."""
    data = b""
    sock.settimeout(10)
    while chunk := sock.recv(65536):
        data += chunk
    frames = []
    while data:
        length, request_id, status, _ = RESPONSE.unpack_from(data)
        frames.append((request_id, status, data[RESPONSE.size : 4 + length]))
        data = data[4 + length :]
    return frames


async def test_bad_frames_close_only_that_connection(daemon, tenant):
    async with Client(daemon.address, tenant=tenant, transport="ucx") as kv:
        await kv.put(b"still", b"here")
        name = conn_of(kv).hello.local_socket
        assert name
        loop = asyncio.get_running_loop()

        def raw(data: bytes) -> list[tuple[int, int, bytes]]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(socket_address(name))
                sock.sendall(data)
                return read_frames(sock)

        # Not our protocol at all.
        ((request_id, status, _),) = await loop.run_in_executor(None, raw, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (request_id, status) == (0, 3)  # INVALID_ARGUMENT, about the connection
        # A frame over the daemon's message limit: refused before its payload arrives.
        limit = daemon.config.max_message_bytes
        header = REQUEST.pack(REQUEST.size - 4 + 3 + limit + 1, 7, NO_EPOCH, 0.0, 3) + b"Put"
        ((request_id, status, detail),) = await loop.run_in_executor(None, raw, PREAMBLE + header + b"\0" * 1000)
        assert (request_id, status) == (7, 8)  # RESOURCE_EXHAUSTED
        assert b"exceeds the daemon's message limit" in detail
        # A frame whose length cannot hold its own header.
        ((request_id, status, _),) = await loop.run_in_executor(None, raw, PREAMBLE + REQUEST.pack(3, 1, NO_EPOCH, 0.0, 9) + b"x" * 20)
        assert (request_id, status) == (0, 3)
        # An unknown method is answered, and the connection stays usable.
        def unknown_then_close() -> tuple[int, int]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(socket_address(name))
                sock.sendall(PREAMBLE + REQUEST.pack(REQUEST.size - 4 + 5, 5, NO_EPOCH, 0.0, 5) + b"Nope!")
                sock.settimeout(10)
                reply = sock.recv(65536)
                length, request_id, status, _ = RESPONSE.unpack_from(reply)
                return request_id, status

        assert await loop.run_in_executor(None, unknown_then_close) == (5, 12)  # UNIMPLEMENTED
        # The well-behaved client never noticed.
        assert await kv.get(b"still") == b"here"
        assert not conn_of(kv).local.closed


async def test_a_client_gone_mid_request_leaks_nothing(own_daemon, tenant):
    d = await own_daemon()
    state = hold(d, "Exists", 5)
    async with Client(d.address, tenant=tenant, transport="ucx") as kv:
        await kv.connect()
        name = conn_of(kv).hello.local_socket
    request = data_pb2.KeysRequest(namespace=data_pb2.Namespace(tenant=tenant, subtenant="default"), keys=[b"a"]).SerializeToString()
    reader, writer = await asyncio.open_unix_connection(socket_address(name))
    writer.write(PREAMBLE + REQUEST.pack(REQUEST.size - 4 + 6 + len(request), 1, NO_EPOCH, 0.0, 6) + b"Exists" + request)
    await writer.drain()
    await wait_for(lambda: state["started"], 2)
    assert state["started"] == 1 and len(d.local.connections) == 1
    writer.close()
    await wait_for(lambda: not d.local.connections and state["cancelled"], 2)
    assert state["cancelled"] == 1 and not d.local.connections


async def test_switches_off_mean_grpc(own_daemon, tenant):
    d = await own_daemon(local_channel=False)
    async with Client(d.address, tenant=tenant, transport="ucx") as kv:
        await kv.put(b"a", b"1")
        assert conn_of(kv).hello.local_socket == "" and conn_of(kv).local is None
        assert await kv.get(b"a") == b"1"
    d = await own_daemon(data_plane=False)
    async with Client(d.address, tenant=tenant) as kv:
        await kv.put(b"a", b"1")
        assert conn_of(kv).hello.local_socket == "" and d.local is None
    d = await own_daemon()
    for settings in ({"local_channel": False}, {"ucx_tls": "tcp"}):
        async with Client(d.address, tenant=tenant, transport="ucx", **settings) as kv:
            await kv.put(b"a", b"1")
            assert conn_of(kv).hello.local_socket and conn_of(kv).local is None
            assert await kv.get(b"a") == b"1"
    assert ClientConfig.load(environ={"KVSTORE_LOCAL_CHANNEL": "false"}).local_channel is False


async def test_unreachable_socket_falls_back_to_grpc(own_daemon, tenant):
    d = await own_daemon()
    async with Client(d.address, tenant=tenant, transport="ucx") as kv:
        await kv.connect()
        conn = conn_of(kv)
        conn._local_name = "kvstore/no-such-daemon"  # as if the daemon were in another network namespace
        await kv.put(b"a", b"1")
        assert conn.local is None and await kv.get(b"a") == b"1"


async def test_deadline_of_a_held_call(own_daemon, tenant):
    d = await own_daemon()
    ns = data_pb2.Namespace(tenant=tenant, subtenant="default")
    request = data_pb2.KeysRequest(namespace=ns, keys=[b"a"])
    async with (
        Client(d.address, tenant=tenant, transport="ucx") as local,
        Client(d.address, tenant=tenant, transport="ucx", local_channel=False) as grpc_only,
    ):
        await local.put(b"a", b"1")
        state = hold(d, "Exists", 3)
        for kv in (local, grpc_only):
            started = asyncio.get_running_loop().time()
            with pytest.raises(errors.DeadlineExceededError) as info:
                await kv._maps.call(node_of(kv), "data", "Exists", request, 0.3)
            assert asyncio.get_running_loop().time() - started < 2
            assert info.value.message.endswith(f"[DEADLINE_EXCEEDED from {d.address}]")
            assert info.value.code == "ERROR_CODE_UNSPECIFIED" and info.value.index == -1 and info.value.retryable
        for _ in range(100):  # the daemon stopped working on both
            if state["cancelled"] == 2:
                break
            await asyncio.sleep(0.02)
        assert state == {"started": 2, "cancelled": 2}
        assert all(not conn.tasks for conn in d.local.connections)
        d.local.methods["Exists"].handler = d.data.exists
        assert conn_of(local).local is not None and not conn_of(local).local.closed
        assert await local.exists([b"a", b"b"]) == [True, False]


async def test_drain_lets_in_flight_calls_finish(own_daemon, tenant):
    d = await own_daemon()
    async with Client(d.address, tenant=tenant, transport="ucx", read_failures="raise") as kv:
        await kv.put(b"a", b"1")
        hold(d, "Exists", 0.5)
        call = asyncio.create_task(kv.exists([b"a"]))
        await asyncio.sleep(0.2)
        await d.stop(grace=5)
        assert await call == [True]
        assert conn_of(kv).local.calls >= 2


async def test_daemon_death_and_restart(daemon_process, tenant):
    proc = daemon_process("--memory", "64MiB").start()
    async with Client(proc.address, tenant=tenant, transport="ucx", read_failures="raise") as kv:
        with kv.allocate(64 * KIB) as region:
            region.buffer[:] = os.urandom(64 * KIB)
            keys = [b"r%d" % i for i in range(16)]
            offsets, sizes = [i * KIB for i in range(16)], [KIB] * 16
            assert await kv.put_from(keys, region, offsets, sizes, durability="sync") == 16
            conn = conn_of(kv)
            first = conn.local
            assert first is not None and first.calls >= 1

            # Frozen daemon: the call's deadline passes, as over gRPC.
            request = data_pb2.KeysRequest(namespace=kv.namespace, keys=[b"r0"])
            proc.proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(errors.DeadlineExceededError):
                    await kv._maps.call(node_of(kv), "data", "Exists", request, 0.3)
                # Killed under a pending call: it fails as retryable UNAVAILABLE.
                pending = asyncio.create_task(kv._maps.call(node_of(kv), "data", "Exists", request, 10))
                await asyncio.sleep(0.2)
                proc.kill9()
            finally:
                if proc.proc.poll() is None:
                    proc.proc.send_signal(signal.SIGCONT)
            with pytest.raises(errors.UnavailableError) as info:
                await pending
            assert info.value.retryable and info.value.message.endswith(f"[UNAVAILABLE from {proc.address}]")
            assert first.closed

            proc.start()  # same port, new process, new socket name
            back = bytearray(KIB * 16)
            with kv.allocate(64 * KIB) as dst:
                assert await kv.get_into(keys, dst, offsets, sizes) == sizes
                back[:] = dst.buffer[: 16 * KIB]
            assert bytes(back) == bytes(region.buffer[: 16 * KIB])
            second = conn.local
            assert second is not None and second is not first and second.name != first.name
            assert await kv.put_from([b"after"], region, [0], [KIB]) == 1
            assert await kv.exists([b"after"]) == [True]
            assert second.calls >= 2 and not second.closed


async def test_a_flood_of_calls_is_served_a_bounded_number_at_a_time(own_daemon, tenant):
    """Calls past MAX_IN_FLIGHT on one connection wait unread until earlier ones finish:
    no client piles up unbounded work in the daemon, and every call is still answered."""
    from kvstore.server.rpc.local import MAX_IN_FLIGHT

    d = await own_daemon()
    hold(d, "Exists", 0.02)
    async with Client(d.address, tenant=tenant, transport="ucx") as kv:
        await kv.connect()
        await kv.put(b"here", b"1")
        name = conn_of(kv).hello.local_socket
    request = data_pb2.KeysRequest(
        namespace=data_pb2.Namespace(tenant=tenant, subtenant="default"), keys=[b"here", b"absent"]
    ).SerializeToString()
    count = 3 * MAX_IN_FLIGHT
    frames = b"".join(
        REQUEST.pack(REQUEST.size - 4 + 6 + len(request), i, NO_EPOCH, 0.0, 6) + b"Exists" + request
        for i in range(1, count + 1)
    )
    reader, writer = await asyncio.open_unix_connection(socket_address(name))
    writer.write(PREAMBLE + frames)  # all at once: the daemon reads them in one go
    peak = 0
    answers = {}
    try:
        while len(answers) < count:
            for conn in d.local.connections:
                peak = max(peak, len(conn.tasks))
            header = await asyncio.wait_for(reader.readexactly(RESPONSE.size), 30)
            length, request_id, status, _ = RESPONSE.unpack(header)
            body = await reader.readexactly(4 + length - RESPONSE.size)
            assert status == 0, body
            answers[request_id] = data_pb2.ExistsResponse.FromString(body).exists
        from prometheus_client import generate_latest

        for _ in range(50):  # the last call's task ends just after its answer is written
            metrics = generate_latest(d.metrics.registry).decode()
            if "kvstore_local_channel_calls_in_flight 0.0" in metrics:
                break
            await asyncio.sleep(0.02)
        assert "kvstore_local_channel_connections 1.0" in metrics
        assert "kvstore_local_channel_calls_in_flight 0.0" in metrics
    finally:
        writer.close()
    assert sorted(answers) == list(range(1, count + 1))
    assert all(list(found) == [True, False] for found in answers.values())
    assert MAX_IN_FLIGHT // 2 <= peak <= MAX_IN_FLIGHT


async def test_requests_in_flight_counts_both_transports_and_every_ending(own_daemon, tenant):
    """The daemon counts the requests it is serving over gRPC and the local channel
    alike, and a call that fails or that its client gave up on is counted out."""
    from prometheus_client import generate_latest

    d = await own_daemon()
    async with (
        Client(d.address, tenant=tenant, transport="ucx") as local,
        Client(d.address, tenant=tenant, local_channel=False) as remote,
    ):
        await local.put(b"a", b"1")
        await remote.put(b"b", b"2")
        assert conn_of(local).local is not None and conn_of(remote).local is None
        held = hold(d, "Exists", 0.3)
        calls = [asyncio.create_task(local.exists([b"a"])), asyncio.create_task(remote.exists([b"b"]))]
        await wait_for(lambda: d.metrics.requests_in_flight == 2)
        assert "kvstore_requests_in_flight 2.0" in generate_latest(d.metrics.registry).decode()
        assert await asyncio.gather(*calls) == [[True], [True]]
        await wait_for(lambda: d.metrics.requests_in_flight == 0)

        ns = data_pb2.Namespace(tenant=tenant, subtenant="default")
        with pytest.raises(errors.DeadlineExceededError):  # the client gives up: the daemon cancels the call
            await local._maps.call(node_of(local), "data", "Exists", data_pb2.KeysRequest(namespace=ns, keys=[b"c"]), 0.05)
        await wait_for(lambda: held["cancelled"] == 1)
        bad = data_pb2.PutRequest(namespace=ns, durability=99)
        assert isinstance(await failure(local, "Put", bad), errors.InvalidArgumentError)
        await wait_for(lambda: d.metrics.requests_in_flight == 0)
    assert "kvstore_requests_in_flight 0.0" in generate_latest(d.metrics.registry).decode()


async def test_a_copy_runs_on_the_event_loop_only_while_no_other_request_waits(own_daemon, tenant):
    """A shared-memory copy too large to be always inline skips the thread hand-off
    when its request is the only one being served, and is handed to a copy thread
    when another request is being served meanwhile."""
    from kvstore.server.dataplane import ALONE_INLINE_COPY_BYTES, INLINE_COPY_BYTES

    d = await own_daemon()
    native = d.dataplane._native
    threads = []

    class Recording:
        def __getattr__(self, name):
            return getattr(native, name)

        def copy_blocks(self, *args, **kwargs):
            threads.append(threading.current_thread())
            return native.copy_blocks(*args, **kwargs)

    d.dataplane._native = Recording()
    block = 2 << 20
    count = 3
    assert INLINE_COPY_BYTES < count * block <= ALONE_INLINE_COPY_BYTES
    hold(d, "Exists", 0.5)
    async with Client(d.address, tenant=tenant, transport="ucx", ucx_tls="shm,tcp") as kv:
        with kv.allocate(count * block) as src, kv.allocate(count * block) as dst:
            data = os.urandom(count * block)
            src.buffer[:] = data
            keys = [b"b%d" % i for i in range(count)]
            offsets = [i * block for i in range(count)]
            assert await kv.put_from(keys, src, offsets, [block] * count) == count
            assert threads == [threading.current_thread()]  # the daemon's loop is this test's

            waiting = asyncio.create_task(kv.exists([b"x"]))
            await wait_for(lambda: d.metrics.requests_in_flight == 1)
            assert await kv.get_into(keys, dst, offsets, [block] * count) == [block] * count
            assert await waiting == [False]
            assert bytes(dst.buffer) == data
    assert len(threads) == 2 and threads[1].name.startswith("kvstore-copy")
