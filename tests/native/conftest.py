"""Fixtures of the native data-plane tests: contexts, workers and endpoints
over shared memory and TCP, all on this machine (TCP on 127.0.0.1 only)."""

from __future__ import annotations

import pytest

from kvstore import _native
from tests.native.support import LOOPBACK, TRANSPORTS, Peer


@pytest.fixture(scope="session", params=TRANSPORTS)
def context(request) -> _native.Context:
    return _native.Context(request.param, settings=LOOPBACK)


@pytest.fixture(scope="session")
def shm_context() -> _native.Context:
    return _native.Context("shm,tcp", settings=LOOPBACK)


@pytest.fixture(scope="session")
def worker(context):
    with _native.Worker(context) as worker:
        yield worker


@pytest.fixture(scope="session")
def peer_worker(context):
    with _native.Worker(context) as worker:
        yield worker


@pytest.fixture(scope="session", params=["loopback", "two-workers"])
def endpoint(request, worker, peer_worker) -> _native.Endpoint:
    """An endpoint to the worker itself, or to a second worker of the process."""
    target = worker if request.param == "loopback" else peer_worker
    return worker.connect(target.address)


@pytest.fixture
def start_peer():
    """Factory of peer processes, all killed at the end of the test."""
    peers: list[Peer] = []

    def start(tls: str, length: int) -> Peer:
        peer = Peer(tls, length)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.stop()
