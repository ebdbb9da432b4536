"""Data-plane sessions belong to the client that said Hello: a request names its
session by the secret Hello handed that client alone, never by the client id
anyone may repeat; and every descriptor must lie inside the region it claims.
Each test replays an attack that worked when sessions were found by client id
or descriptors were not bounded, and checks that it now does no harm."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from kvstore import errors
from kvstore._proto.v1 import cluster_pb2, cluster_pb2_grpc, data_pb2, data_pb2_grpc
from kvstore.checksum import checksum
from kvstore.client import Client
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.status import error_from_rpc

try:
    from kvstore import _native

    NATIVE = _native.available()
except ImportError:
    NATIVE = False

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(not NATIVE, reason="no native data plane")]

SECRET = b"\x00victim-bytes\xff" * 64


async def raw_call(address: str, method: str, request):
    """One Data call straight over gRPC, with nothing the SDK would add."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            return await getattr(data_pb2_grpc.DataStub(channel), method)(request, timeout=10)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, address) from None


def node_of(kv: Client) -> str:
    (node,) = kv._maps.view.nodes
    return node


async def test_a_client_id_names_no_session(daemon, tenant):
    """Another client's id (it is logged, and anyone may repeat it) with its
    region's rkey and addresses moves no byte in either direction."""
    victim_memory = bytearray(SECRET)
    async with Client(daemon.address, tenant=tenant, transport="ucx") as victim:
        with victim.register(victim_memory) as region:
            await victim.put_from([b"own"], region, [0], [64])  # the victim's session is up
            wire = region.wire()
            ns = data_pb2.Namespace(tenant=tenant, subtenant="attacker")
            steal = data_pb2.PutRequest(
                namespace=ns,
                client_id=victim.client_id,
                region=wire,
                blocks=[data_pb2.BlockWrite(key=b"stolen", length=64, checksum=checksum(SECRET[:64]), remote_address=region.address)],
            )
            smash = data_pb2.GetRequest(
                namespace=data_pb2.Namespace(tenant=tenant, subtenant="default"),
                keys=[b"own"],
                client_id=victim.client_id,
                region=wire,
                slots=[data_pb2.RemoteSlot(address=region.address + 100, capacity=64)],
            )
            for method, request in (("Put", steal), ("Get", smash)):
                for session in (b"", b"\x01" * 16):  # none, or a guess
                    request.session = session
                    with pytest.raises(errors.SessionLostError) as info:
                        await raw_call(daemon.address, method, request)
                    assert info.value.code == ErrorCode.UNKNOWN_CLIENT and info.value.retryable
                    assert not session or session.hex() not in info.value.message
            assert bytes(victim_memory) == SECRET  # nothing was written into the victim
            async with Client(daemon.address, tenant=tenant, subtenant="attacker") as attacker:
                assert await attacker.get(b"stolen") is None  # nothing was read out of it
            # The victim's own session still serves it.
            assert await victim.get_into([b"own"], region, [200], [64]) == [64]


async def test_a_hello_that_repeats_a_client_id_leaves_that_clients_session_alone(daemon, tenant):
    async with Client(daemon.address, tenant=tenant, transport="ucx") as victim:
        with victim.allocate(1 << 16) as region:
            region.buffer[:5] = b"first"
            await victim.put_from([b"k"], region, [0], [5])
            conn = next(iter(victim._nodes.connections.values()))
            generation, session = conn.generation, conn.hello.session
            # Another process introduces itself under the victim's id, with a worker of its own
            # (and a guess at the session to replace: only the secret's holder can name it).
            context = _native.Context(None)
            worker = _native.Worker(context)
            try:
                async with grpc.aio.insecure_channel(daemon.address) as channel:
                    hello = await cluster_pb2_grpc.ClusterStub(channel).Hello(
                        cluster_pb2.HelloRequest(client_id=victim.client_id, worker_address=worker.address, previous_session=b"\x02" * 16),
                        timeout=10,
                    )
            finally:
                worker.close()
            assert hello.data_plane and hello.session not in (b"", session)
            region.buffer[:6] = b"second"
            await victim.put_from([b"k"], region, [0], [6])
            assert await victim.get_into([b"k"], region, [100], [16]) == [6]
            assert bytes(region.buffer[100:106]) == b"second"
            assert conn.generation == generation  # served by its first session: it never had to Hello again


async def test_descriptors_outside_the_registered_region_are_refused_before_any_byte_moves(daemon, tenant):
    memory = bytearray(1 << 16)
    guard = bytearray(SECRET)  # other memory of the same process
    async with Client(daemon.address, tenant=tenant, transport="ucx") as kv:
        with kv.register(guard) as other, kv.register(memory) as region:
            memory[:8] = b"in-range"
            await kv.put_from([b"k"], region, [0], [8])
            node = node_of(kv)
            outside = [other.address, region.address + region.length, region.address + region.length - 4, region.address - 8]
            for address in outside:
                get = data_pb2.GetRequest(
                    namespace=kv.namespace,
                    keys=[b"absent", b"k"],
                    region=region.wire(),
                    slots=[data_pb2.RemoteSlot(address=region.address, capacity=8), data_pb2.RemoteSlot(address=address, capacity=8)],
                )
                with pytest.raises(errors.InvalidArgumentError) as info:
                    await kv._maps.call(node, "data", "Get", get, 5)
                assert info.value.index == 1 and "outside" in info.value.message
                put = data_pb2.PutRequest(
                    namespace=kv.namespace,
                    region=region.wire(),
                    blocks=[
                        data_pb2.BlockWrite(key=b"fine", length=8, checksum=checksum(bytes(memory[:8])), remote_address=region.address),
                        data_pb2.BlockWrite(key=b"far", length=8, checksum=checksum(SECRET[:8]), remote_address=address),
                    ],
                )
                with pytest.raises(errors.InvalidArgumentError) as info:
                    await kv._maps.call(node, "data", "Put", put, 5)
                assert info.value.index == 1
            assert bytes(guard) == SECRET
            assert await kv.exists([b"fine", b"far"]) == [False, False]  # the whole request was refused
            # A region that names no range is not served by RMA at all.
            unbounded = region.wire()
            unbounded.length = 0
            get = data_pb2.GetRequest(
                namespace=kv.namespace, keys=[b"k"], region=unbounded, slots=[data_pb2.RemoteSlot(address=region.address, capacity=8)]
            )
            with pytest.raises(errors.InvalidArgumentError) as info:
                await kv._maps.call(node, "data", "Get", get, 5)
            assert "no valid address range" in info.value.message
            # The session survives its client's bad requests.
            assert await kv.get_into([b"k"], region, [64], [8]) == [8] and bytes(memory[64:72]) == b"in-range"


@contextlib.asynccontextmanager
async def raw_hellos(address: str, count: int, token: str = ""):
    """``count`` Hellos, each from a worker of its own (as a flood from one process
    would be); yields their sessions while the workers live."""
    workers = [_native.Worker(_native.Context(None)) for _ in range(count)]
    credential = ((("authorization", f"Bearer {token}"),) if token else ())
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = cluster_pb2_grpc.ClusterStub(channel)
            yield [
                (await stub.Hello(cluster_pb2.HelloRequest(client_id=f"flood-{i}", worker_address=w.address), timeout=30,
                                  metadata=credential)).session
                for i, w in enumerate(workers)
            ]
    finally:
        for worker in workers:
            worker.close()


async def test_a_flood_of_hellos_holds_at_most_max_sessions_and_clients_say_hello_again(tmp_path, tenant):
    from tests.conftest import ThreadedDaemon

    d = ThreadedDaemon(tmp_path / "d", max_sessions=3)
    try:
        async with Client(d.address, tenant=tenant, transport="ucx") as kv:
            with kv.allocate(1 << 16) as region:
                region.buffer[:4] = b"keep"
                await kv.put_from([b"k"], region, [0], [4])
                conn = next(iter(kv._nodes.connections.values()))
                generation = conn.generation
                async with raw_hellos(d.address, 8) as sessions:
                    assert len(set(sessions)) == 8 and len(d.daemon.dataplane.sessions) == 3
                    assert set(d.daemon.dataplane.sessions) == set(sessions[-3:])  # the least recently used went first
                    # The client's session was among those closed: it says Hello again and carries on.
                    assert await kv.get_into([b"k"], region, [64], [4]) == [4] and bytes(region.buffer[64:68]) == b"keep"
                    assert conn.generation == generation + 1
                    assert len(d.daemon.dataplane.sessions) == 3
    finally:
        d.stop()


async def test_a_flood_of_hellos_from_one_client_closes_its_own_sessions_only(tmp_path, tenant):
    """Past sessions_per_client, the flooding credential loses its own oldest sessions, never another's."""
    from tests.conftest import ThreadedDaemon

    admin = "admin-token-of-the-session-tests-0123"
    d = ThreadedDaemon(tmp_path / "d", sessions_per_client=3, auth="token", admin_token=admin)
    try:
        async with Client(d.address, token=admin, transport="inline") as a:
            await a.create_namespace(tenant, "default")
            victim, flooder = (await a.create_token(tenant))["token"], (await a.create_token(tenant))["token"]
        async with Client(d.address, tenant=tenant, token=victim, transport="ucx") as kv:
            with kv.allocate(1 << 16) as region:
                region.buffer[:4] = b"keep"
                await kv.put_from([b"k"], region, [0], [4])
                conn = next(iter(kv._nodes.connections.values()))
                generation = conn.generation
                async with raw_hellos(d.address, 8, flooder) as sessions:
                    held = set(d.daemon.dataplane.sessions)
                    assert held & set(sessions) == set(sessions[-3:])  # the flooder's newest three
                    assert conn.hello.session in held
                    assert await kv.get_into([b"k"], region, [64], [4]) == [4] and bytes(region.buffer[64:68]) == b"keep"
                    assert conn.generation == generation  # the victim never had to say Hello again
    finally:
        d.stop()


async def test_sessions_unused_for_session_idle_are_closed(tmp_path):
    from tests.conftest import ThreadedDaemon

    d = ThreadedDaemon(tmp_path / "d", session_idle=0.2)
    try:
        async with raw_hellos(d.address, 2) as first:
            assert set(first) <= set(d.daemon.dataplane.sessions)
            await asyncio.sleep(0.5)  # well past session_idle
            async with raw_hellos(d.address, 1) as last:
                assert list(d.daemon.dataplane.sessions) == last
    finally:
        d.stop()
