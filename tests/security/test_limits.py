"""One client cannot starve the rest: bytes of inline gets in flight, requests per
tenant, request rates per namespace, and connections that never speak are all
bounded, and each refusal is a precise, retryable RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from kvstore import errors
from kvstore._proto.v1 import data_pb2 as pb
from kvstore.client import SyncClient
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.status import error_from_rpc
from kvstore.server.admission import Admission
from tests.conftest import ThreadedDaemon

MiB = 1 << 20
BYSTANDER = """
import sys, time, grpc
from kvstore._proto.v1 import data_pb2 as pb
with grpc.insecure_channel(sys.argv[1]) as channel:
    stat = channel.unary_unary("/kvstore.v1.Data/Stat", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=pb.StatResponse.FromString)
    worst = 0.0
    for _ in range(40):
        started = time.monotonic()
        stat(pb.StatRequest(namespace=pb.Namespace(tenant="quiet", subtenant="default")), timeout=30)
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.05)
print(worst)
"""


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_concurrent_big_inline_gets_hold_bounded_memory_and_others_are_served(daemon_process):
    """The campaign's finding: 48 concurrent inline Gets of 4 x 16 MiB took the daemon
    from 460 MB to 3.6 GB and another client's Stat 6.4 s. Now each connection holds at
    most its in-flight budget; the gets are answered in parts and still return every byte."""
    d = daemon_process("--memory", "128MiB", "--connection-in-flight-bytes", "128MiB", "--tenant-in-flight-bytes", "256MiB")
    d.start()
    blocks = {f"big{i}".encode(): os.urandom(16 * MiB) for i in range(4)}
    with SyncClient(d.address, tenant="hog", transport="inline") as c:
        c.put_many(blocks, durability="disk")
    baseline = rss(d.pid)
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss(d.pid))
            time.sleep(0.01)

    async def hog() -> list[int]:
        async with grpc.aio.insecure_channel(d.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
            get = channel.unary_unary("/kvstore.v1.Data/Get", request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=pb.GetResponse.FromString)
            request = pb.GetRequest(namespace=pb.Namespace(tenant="hog", subtenant="default"), keys=list(blocks))
            replies = await asyncio.gather(*(get(request, timeout=60) for _ in range(48)))
        for reply in replies:  # a leading part of the keys, byte-exact
            assert 1 <= len(reply.results) <= 4
            for key, result in zip(blocks, reply.results):
                assert result.found and result.value == blocks[key]
        return [len(r.results) for r in replies]

    # Another tenant, in a process of its own (this one is busy parsing the hog's answers).
    bystander = subprocess.Popen(
        [sys.executable, "-c", BYSTANDER, d.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        answered = asyncio.run(hog())
        out, err = bystander.communicate(timeout=120)
    finally:
        stop.set()
        sampler.join()
        bystander.kill()
    assert bystander.returncode == 0, err
    worst_stat = float(out)
    assert sum(answered) >= 48  # every get answered at least one block, byte-exact (checked above)
    growth = peak[0] - baseline
    # Unbounded, the 48 gets hold 48 x 64 MiB of values and their responses at once (3.2 GB measured).
    assert growth < 600 * MiB, f"RSS grew by {growth / MiB:.0f} MiB"
    assert worst_stat < 2.0, f"another tenant's Stat took {worst_stat:.2f} s"


async def test_a_tenant_past_its_concurrent_requests_is_refused_precisely():
    admission = Admission(total_bytes=1 << 30, tenant_bytes=1 << 30, connection_bytes=1 << 30, tenant_requests=2)
    admission.admit("a", "x")
    admission.admit("a", "y")
    with pytest.raises(errors.ResourceExhaustedError) as caught:
        admission.admit("a", "x")
    assert caught.value.code == ErrorCode.TOO_MANY_IN_FLIGHT and caught.value.retryable
    admission.admit("b", "x")  # other tenants are not affected
    admission.done("a")
    admission.admit("a", "x")


async def test_inline_bytes_wait_for_room_then_give_up():
    admission = Admission(total_bytes=100, tenant_bytes=100, connection_bytes=60, tenant_requests=10, wait=0.2)
    first = await admission.reserve("t", "c1")
    assert first.budget == 30  # values, and the response they make, within the connection's 60
    first.settle(30)
    second = await admission.reserve("t", "c2")
    assert second.budget == 20  # another connection: the tenant's rest
    second.settle(1)  # one small block read: the rest goes back at once
    assert admission.bytes_total == 62
    waiting = asyncio.ensure_future(admission.reserve("t", "c1"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    first.release()
    assert (await waiting).budget == 30
    with pytest.raises(errors.ResourceExhaustedError) as caught:
        await admission.reserve("t", "c1")
    assert caught.value.code == ErrorCode.TOO_MANY_IN_FLIGHT


def test_a_namespace_rate_limit(tmp_path):
    d = ThreadedDaemon(tmp_path / "data", memory=64 << 20)
    try:
        with SyncClient(d.address, tenant="busy", transport="inline") as c:
            assert c.set_rate_limit(5, burst=5) == {"requests_per_second": 5.0, "burst": 5}
        with grpc.insecure_channel(d.address) as channel:
            stat = channel.unary_unary("/kvstore.v1.Data/Stat", request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=None)
            outcomes = []
            for tenant in ["busy"] * 20 + ["calm"] * 20:
                try:
                    stat(pb.StatRequest(namespace=pb.Namespace(tenant=tenant, subtenant="default")), timeout=5)
                    outcomes.append((tenant, "OK"))
                except grpc.RpcError as exc:
                    error = error_from_rpc(exc)
                    assert isinstance(error, errors.ResourceExhaustedError) and error.retryable
                    outcomes.append((tenant, error.code))
        busy = [o for t, o in outcomes if t == "busy"]
        assert 5 <= busy.count("OK") <= 7 and busy.count(ErrorCode.RATE_LIMITED) >= 13
        assert all(o == "OK" for t, o in outcomes if t == "calm")
        with SyncClient(d.address, tenant="busy", transport="inline") as c:
            c.set_replication(1)  # a replication change leaves the rate alone
            assert c.set_rate_limit(0) == {"requests_per_second": 0.0, "burst": 0}
            for _ in range(20):
                c.stat()
    finally:
        d.stop()


def test_connections_that_never_speak_are_closed(tmp_path):
    d = ThreadedDaemon(tmp_path / "data", memory=64 << 20)
    try:
        host, port = d.address.rsplit(":", 1)
        silent = [socket.create_connection((host, int(port))) for _ in range(50)]
        deadline = time.monotonic() + 20
        for sock in silent:
            # The daemon's SETTINGS, then a GOAWAY ("handshake timeout"), then the end.
            while True:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    if sock.recv(1 << 16) == b"":
                        break
                except (TimeoutError, socket.timeout):
                    raise AssertionError("the daemon kept a silent connection open") from None
                except ConnectionResetError:
                    break
            sock.close()
        with SyncClient(d.address, transport="inline") as c:
            c.put(b"k", b"v")
            assert c.get(b"k") == b"v"
    finally:
        d.stop()


class _Endpoint:
    """A client endpoint whose transfers fail (the seam under test is the session's bookkeeping)."""

    def __init__(self, failed: bool) -> None:
        self.failed = failed
        self.closed = False

    async def get(self, *args):
        raise errors.TransportError("remote access error")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("endpoint_failed", [False, True])
async def test_one_failed_transfer_drops_the_session_only_when_its_endpoint_broke(endpoint_failed):
    from kvstore.server.dataplane import ClientSession, DataPlane

    plane = DataPlane(memoryview(bytearray(4096)), "", enabled=False)
    session = ClientSession("client", b"s" * 16, _Endpoint(endpoint_failed), "open:")
    plane.sessions[session.secret] = session
    plane.arena_handle = None  # registered arena memory: not reached, the endpoint fails first
    with pytest.raises(errors.UnavailableError) as caught:
        await plane._transfer(session, "get", None, [0], [0], [1])
    assert caught.value.code == ErrorCode.TRANSFER_FAILED and caught.value.retryable
    assert (session.secret in plane.sessions) is (not endpoint_failed)
    assert session.endpoint.closed is endpoint_failed


def test_connections_past_max_connections_are_closed_and_the_rest_serve(tmp_path):
    d = ThreadedDaemon(tmp_path / "data", memory=64 << 20, max_connections=8)
    try:
        host, port = d.address.rsplit(":", 1)
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS
        socks = []
        for _ in range(20):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(preface)
            socks.append(sock)
        closed = 0
        for sock in socks:
            sock.settimeout(2)
            try:
                closed += sock.recv(64) == b""
            except ConnectionResetError:
                closed += 1
        assert closed >= 12  # every one past the first 8
        for sock in socks:
            sock.close()
        with SyncClient(d.address, transport="inline") as c:
            c.put(b"k", b"v")
            assert c.get(b"k") == b"v"
    finally:
        d.stop()
