"""Endpoint: connecting by worker address, closing, and what a closed endpoint does."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore import _native, errors
from tests.native.support import Completion

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def worker(shm_context):
    with _native.Worker(shm_context) as worker:
        yield worker


@pytest.fixture(scope="module")
def buffer(shm_context):
    array = np.arange(1 << 20, dtype=np.uint32)
    with shm_context.register(array) as handle:
        yield handle


def test_connect_and_close(worker):
    endpoint = worker.connect(worker.address)
    assert endpoint.worker is worker
    assert not endpoint.failed and not endpoint.closed
    endpoint.close()
    endpoint.close()  # idempotent
    assert endpoint.closed and not endpoint.failed


def test_connect_accepts_bytes_like(worker):
    worker.connect(bytearray(worker.address)).close()
    worker.connect(memoryview(worker.address)).close()


@pytest.mark.parametrize("address", [b"", "text", None])
def test_connect_rejects_non_addresses(worker, address):
    with pytest.raises(errors.InvalidArgumentError):
        worker.connect(address)


def test_closed_endpoint_refuses_transfers(worker, buffer):
    endpoint = worker.connect(worker.address)
    rkey = endpoint.unpack_rkey(buffer.packed_rkey)
    endpoint.close()
    done = Completion()
    with pytest.raises(_native.EndpointClosedError) as info:
        endpoint.get(buffer, [0], [buffer.address], [4], rkey, done)
    assert info.value.code == "TRANSFER_FAILED"
    assert isinstance(info.value, errors.UnavailableError) and info.value.retryable
    with pytest.raises(_native.EndpointClosedError):
        endpoint.put(buffer, [0], [buffer.address], [4], rkey, done)
    assert done.calls == []


async def test_close_with_transfers_in_flight(shm_context, worker, buffer):
    endpoint = worker.connect(worker.address)
    rkey = endpoint.unpack_rkey(buffer.packed_rkey)
    await endpoint.get_async(buffer, [0], [buffer.address + 8], [8], rkey)  # connected
    local = np.zeros(1 << 20, dtype=np.uint32)
    with shm_context.register(local) as handle:
        done = [Completion() for _ in range(20)]
        for completion in done:
            endpoint.get(handle, [0], [buffer.address], [handle.length], rkey, completion)
        endpoint.close()
        for completion in done:
            status, message = completion.wait()
            if status != 0:  # canceled, unless it finished first
                assert isinstance(_native.error_for_status(status, message), _native.EndpointClosedError)


def test_many_endpoints(worker, buffer):
    for _ in range(50):
        endpoint = worker.connect(worker.address)
        endpoint.unpack_rkey(buffer.packed_rkey).close()
        endpoint.close()
    endpoints = [worker.connect(worker.address) for _ in range(50)]
    for endpoint in endpoints:
        endpoint.close()
