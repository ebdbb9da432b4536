"""A Hello's worker address is untrusted input: UCX unpacks it without a length
and asserts on what it does not expect (two arbitrary bytes used to abort the
daemon). The daemon tries each address in a sacrificial process first
(server/addresscheck.py); these tests replay the attack and mutations of real
addresses against a daemon subprocess and check that it keeps serving."""

from __future__ import annotations

import random

import grpc
import pytest

from kvstore import errors
from kvstore._proto.v1 import cluster_pb2, cluster_pb2_grpc
from kvstore.client import Client
from kvstore.harness.daemon import DaemonProcess
from kvstore.harness.health import grpc_serving
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.status import error_from_rpc
from kvstore.server.addresscheck import AddressCheck

try:
    from kvstore import _native

    NATIVE = _native.available()
except ImportError:
    NATIVE = False

pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(not NATIVE, reason="no native data plane")]


@pytest.fixture
def live_address():
    worker = _native.Worker(_native.Context(None))
    yield worker.address
    worker.close()


def mutations(address: bytes, count: int, seed: int = 7) -> list[bytes]:
    """Truncations, bit flips, a flipped version nibble, and random bytes."""
    rng = random.Random(seed)
    out = [address[:n] for n in (1, 2, 8, 9, 17, len(address) // 2, len(address) - 1)]
    out.append(bytes([address[0] ^ 0x07]) + address[1:])
    while len(out) < count:
        if rng.random() < 0.7:
            flipped = bytearray(address)
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            out.append(bytes(flipped))
        else:
            out.append(rng.randbytes(rng.randint(1, 300)))
    return out


async def hello(address: str, worker_address: bytes) -> cluster_pb2.HelloResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            return await cluster_pb2_grpc.ClusterStub(channel).Hello(
                cluster_pb2.HelloRequest(client_id="hostile", worker_address=worker_address), timeout=30
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, address) from None


async def test_malformed_worker_addresses_are_refused_and_the_daemon_serves_on(tmp_path, tenant, live_address):
    daemon = DaemonProcess(tmp_path / "d").start()
    try:
        with pytest.raises(errors.InvalidArgumentError) as info:
            await hello(daemon.address, b"\xb7\x91")  # the packet that aborted the daemon
        assert info.value.code == ErrorCode.INVALID_WORKER_ADDRESS
        outcomes: dict[str, int] = {}
        for candidate in mutations(live_address, 40):
            try:
                await hello(daemon.address, candidate)
                outcome = "accepted"
            except (errors.InvalidArgumentError, errors.UnavailableError) as exc:
                outcome = type(exc).__name__  # refused, precisely; never a dropped connection
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            assert daemon.proc.poll() is None, f"the daemon died on {candidate.hex()}"
        assert outcomes.get("InvalidArgumentError", 0) >= 5, outcomes  # the truncations at least
        assert grpc_serving(daemon.address, 5)
        async with Client(daemon.address, tenant=tenant, transport="ucx") as kv:
            with kv.allocate(1 << 16) as region:
                region.buffer[:5] = b"still"
                await kv.put_from([b"k"], region, [0], [5])
                assert await kv.get_into([b"k"], region, [64], [5]) == [5]
    finally:
        daemon.kill9()


async def test_the_check_replaces_a_child_that_an_address_killed(live_address):
    check = AddressCheck(None)
    check.start()
    try:
        await check.check(live_address)
        for bad in (b"\xb7\x91", b"\x00"):
            with pytest.raises(errors.InvalidArgumentError) as info:
                await check.check(bad)
            assert info.value.code == ErrorCode.INVALID_WORKER_ADDRESS
        assert check.replaced >= 1  # the first one killed its child
        await check.check(live_address)  # a new child serves the next Hello
        with pytest.raises(errors.InvalidArgumentError):
            await check.check(b"\x20" * (65 << 10))  # larger than any worker address
    finally:
        await check.close()
