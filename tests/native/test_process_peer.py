"""Transfers with a peer process, and what happens when it is killed mid-transfer:
the pending transfer fails within a bounded time instead of hanging, the
endpoint reports the failure, and the worker goes on serving new endpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
import xxhash

from kvstore import _native
from tests.native.support import LOOPBACK, TRANSPORTS, Completion

pytestmark = pytest.mark.timeout(120)

LENGTH = 32 << 20
CHUNK = 1 << 20


def descriptors(peer, count=LENGTH // CHUNK):
    offsets = [i * CHUNK for i in range(count)]
    return offsets, [peer.buffer + o for o in offsets], [CHUNK] * count


@pytest.mark.parametrize("tls", TRANSPORTS)
async def test_get_and_put_across_processes(tls, start_peer):
    peer = start_peer(tls, LENGTH)
    context = _native.Context(tls, settings=LOOPBACK)
    with _native.Worker(context) as worker:
        endpoint = worker.connect(peer.address)
        rkey = endpoint.unpack_rkey(peer.rkey, address=peer.buffer, length=peer.length)
        local = np.zeros(LENGTH, dtype=np.uint8)
        with context.register(local) as handle:
            offsets, remote, sizes = descriptors(peer)
            await endpoint.get_async(handle, offsets, remote, sizes, rkey)
            assert np.array_equal(local, peer.pattern())
            assert (("cma", "memory") in endpoint.transports) == (tls == "shm,tcp")

            local[:] = np.random.default_rng(3).integers(0, 256, LENGTH, dtype=np.uint8)
            await endpoint.put_async(handle, offsets, remote[::-1], sizes, rkey)  # chunks reversed
            expected = local.reshape(-1, CHUNK)[::-1].tobytes()
            assert int(peer.command("xxh3")) == xxhash.xxh3_64_intdigest(expected)


@pytest.mark.parametrize("tls", TRANSPORTS)
async def test_peer_killed_mid_transfer(tls, start_peer):
    peer = start_peer(tls, LENGTH)
    context = _native.Context(tls, settings=LOOPBACK)
    with _native.Worker(context) as worker:
        endpoint = worker.connect(peer.address)
        rkey = endpoint.unpack_rkey(peer.rkey)
        local = np.zeros(LENGTH, dtype=np.uint8)
        handle = context.register(local)
        offsets, remote, sizes = descriptors(peer)
        await endpoint.get_async(handle, offsets, remote, sizes, rkey)

        async def transfer_forever():
            while True:
                await endpoint.get_async(handle, offsets, remote, sizes, rkey)

        transfers = asyncio.ensure_future(transfer_forever())
        await asyncio.sleep(0.02)  # a batch is in flight
        os.kill(peer.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(_native.TransportError) as info:
            await asyncio.wait_for(transfers, timeout=30)
        elapsed = time.monotonic() - killed
        assert elapsed < 10, f"the failure took {elapsed:.1f} s to surface"
        assert info.value.status is not None and info.value.status < 0

        # The endpoint is marked failed (its error callback has fired) ...
        deadline = time.monotonic() + 10
        while not endpoint.failed and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert endpoint.failed
        with pytest.raises(_native.EndpointClosedError):
            await endpoint.get_async(handle, [0], [peer.buffer], [8], rkey)

        # ... and the worker serves a new endpoint to a new peer.
        second = start_peer(tls, 1 << 20)
        fresh = worker.connect(second.address)
        with fresh.unpack_rkey(second.rkey) as fresh_key:
            await fresh.get_async(handle, [0], [second.buffer], [1 << 20], fresh_key)
        assert np.array_equal(local[: 1 << 20], second.pattern())
        rkey.close()
        handle.close()


@pytest.mark.parametrize("what", ["worker", "endpoint"])
def test_close_with_timeout_lets_transfers_finish(what, start_peer):
    # Over TCP the peer answers our reads; an orderly close waits for the
    # answers, so the peer never sees the connection drop with replies queued.
    peer = start_peer("tcp", 8 << 20)
    context = _native.Context("tcp", settings=LOOPBACK)
    worker = _native.Worker(context)
    endpoint = worker.connect(peer.address)
    rkey = endpoint.unpack_rkey(peer.rkey)
    local = np.zeros(8 << 20, dtype=np.uint8)
    handle = context.register(local)
    done = [Completion() for _ in range(40)]
    for completion in done:
        endpoint.get(handle, [0], [peer.buffer], [8 << 20], rkey, completion)
    if what == "worker":
        worker.close(timeout=30)
    else:
        endpoint.close(timeout=30)
    assert [completion.wait() for completion in done] == [(0, "")] * 40
    assert np.array_equal(local, peer.pattern())
    assert peer.command("xxh3")  # the peer is alive and well
    worker.close()
