"""Batched RMA: get and put over a loopback endpoint and between two workers,
byte-exact from 1 byte to 64 MiB and for 1000 descriptors; descriptor
validation; completion semantics (once, on the progress thread, GIL held)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import numpy as np
import pytest

from kvstore import _native, errors
from tests.native.support import Completion, pattern

pytestmark = pytest.mark.timeout(120)

BIG = 64 << 20


class Buffers:
    """A source filled with a pattern and a destination, both registered."""

    def __init__(self, context: _native.Context) -> None:
        self.src = pattern(BIG)
        self.dst = np.zeros(BIG, dtype=np.uint8)
        self.src_handle = context.register(self.src)
        self.dst_handle = context.register(self.dst)


@pytest.fixture(scope="session")
def buffers(context) -> Buffers:
    return Buffers(context)


@pytest.fixture
def rkey(endpoint, buffers) -> _native.RemoteKey:
    with endpoint.unpack_rkey(buffers.src_handle.packed_rkey) as rkey:
        yield rkey


@pytest.fixture
def dst_rkey(endpoint, buffers) -> _native.RemoteKey:
    with endpoint.unpack_rkey(buffers.dst_handle.packed_rkey) as rkey:
        yield rkey


SIZES = [1, 7, 4096, (1 << 20) + 3, 16 << 20, BIG]


@pytest.mark.parametrize("size", SIZES, ids=[f"{s}B" for s in SIZES])
async def test_get_is_byte_exact(endpoint, buffers, rkey, size):
    buffers.dst[:size] = 0
    offset = 0 if size == BIG else 13  # unaligned on both sides
    remote = buffers.src_handle.address + offset
    await endpoint.get_async(buffers.dst_handle, [0], [remote], [size], rkey)
    assert np.array_equal(buffers.dst[:size], buffers.src[offset : offset + size])


@pytest.mark.parametrize("size", SIZES, ids=[f"{s}B" for s in SIZES])
async def test_put_is_byte_exact(endpoint, buffers, dst_rkey, size):
    buffers.dst[:size] = 0
    offset = 0 if size == BIG else 5
    remote = buffers.dst_handle.address
    # put src[offset:offset+size] into dst[0:size], with src as the local handle
    await endpoint.put_async(buffers.src_handle, [offset], [remote], [size], dst_rkey)
    assert np.array_equal(buffers.dst[:size], buffers.src[offset : offset + size])


async def test_batch_of_1000_descriptors(endpoint, buffers, rkey, dst_rkey):
    rng = np.random.default_rng(7)
    count = 1000
    sizes = rng.integers(1, 40_000, count)
    local_offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # packed, no overlap
    remote_offsets = rng.integers(0, BIG - 40_000, count)
    buffers.dst[: int(sizes.sum())] = 0
    base = buffers.src_handle.address
    await endpoint.get_async(
        buffers.dst_handle,
        local_offsets.tolist(),
        (base + remote_offsets).tolist(),
        sizes.tolist(),
        rkey,
    )
    for local, remote, size in zip(local_offsets, remote_offsets, sizes):
        assert np.array_equal(buffers.dst[local : local + size], buffers.src[remote : remote + size])

    # And back: scatter the packed bytes to 1000 places of the destination's second half.
    half = BIG // 2
    targets = half + np.arange(count) * 20_000
    small = np.minimum(sizes, 20_000)
    await endpoint.put_async(
        buffers.dst_handle,
        local_offsets.tolist(),
        (buffers.dst_handle.address + targets).tolist(),
        small.tolist(),
        dst_rkey,
    )
    for local, target, size in zip(local_offsets, targets, small):
        assert np.array_equal(buffers.dst[target : target + size], buffers.dst[local : local + size])


async def test_concurrent_batches(endpoint, buffers, rkey):
    chunk = 64 << 10
    buffers.dst[: 200 * chunk] = 0
    src = buffers.src_handle.address
    await asyncio.gather(
        *(
            endpoint.get_async(buffers.dst_handle, [i * chunk], [src + (199 - i) * chunk], [chunk], rkey)
            for i in range(200)
        )
    )
    for i in range(200):
        expected = buffers.src[(199 - i) * chunk : (200 - i) * chunk]
        assert np.array_equal(buffers.dst[i * chunk : (i + 1) * chunk], expected)


def test_callback_runs_once_on_the_progress_thread(endpoint, buffers, rkey):
    done = Completion()
    endpoint.get(buffers.dst_handle, [0, 100], [buffers.src_handle.address] * 2, [100, 100], rkey, done)
    assert done.wait() == (0, "")
    time.sleep(0.05)
    assert len(done.calls) == 1
    assert done.threads[0] is not threading.main_thread()


def test_empty_batch_and_zero_sizes_complete(endpoint, buffers, rkey):
    done = Completion()
    endpoint.get(buffers.dst_handle, [], [], [], rkey, done)
    assert done.wait() == (0, "")
    done = Completion()
    endpoint.put(buffers.dst_handle, [0, 10], [buffers.src_handle.address] * 2, [0, 0], rkey, done)
    assert done.wait() == (0, "")


def descriptor_errors(length):
    """(local_offsets, remote_offsets, sizes, bad index) that must be refused."""
    return [
        ([length - 10], [0], [11], 0),  # past the end
        ([0, length], [0, 0], [1, 1], 1),  # starts at the end
        ([0, 0, -1], [0, 0, 0], [1, 1, 1], 2),  # negative offset
        ([0], [0], [-4], 0),  # negative size
        ([2**62], [0], [2**62], 0),  # overflows
    ]


@pytest.mark.parametrize("case", range(5))
def test_out_of_bounds_descriptors_raise_before_posting(endpoint, buffers, rkey, case):
    local_offsets, remote_offsets, sizes, index = descriptor_errors(buffers.dst_handle.length)[case]
    remote = [buffers.src_handle.address + r for r in remote_offsets]
    done = Completion()
    with pytest.raises(errors.InvalidArgumentError) as info:
        endpoint.get(buffers.dst_handle, local_offsets, remote, sizes, rkey, done)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.index == index
    with pytest.raises(errors.InvalidArgumentError):
        endpoint.put(buffers.dst_handle, local_offsets, remote, sizes, rkey, done)
    time.sleep(0.02)
    assert done.calls == []  # nothing was posted


def test_mismatched_lists_raise(endpoint, buffers, rkey):
    src = buffers.src_handle.address
    with pytest.raises(errors.InvalidArgumentError, match="differ in length"):
        endpoint.get(buffers.dst_handle, [0, 1], [src], [1], rkey, Completion())
    with pytest.raises(errors.InvalidArgumentError, match="differ in length"):
        endpoint.get(buffers.dst_handle, [0], [src], [1, 2], rkey, Completion())


async def test_remote_bounds_are_checked_when_known(endpoint, buffers):
    base = buffers.src_handle.address
    with endpoint.unpack_rkey(buffers.src_handle.packed_rkey, address=base + 4096, length=4096) as rkey:
        await endpoint.get_async(buffers.dst_handle, [0], [base + 4096], [4096], rkey)
        for remote, size in [(base + 4095, 2), (base + 8000, 193), (base, 1)]:
            with pytest.raises(errors.InvalidArgumentError) as info:
                await endpoint.get_async(buffers.dst_handle, [0, 0], [base + 4096, remote], [1, size], rkey)
            assert info.value.index == 1


def test_handles_and_keys_must_match_the_endpoint(context, shm_context, worker, endpoint, buffers, rkey):
    other = worker.connect(worker.address)
    try:
        foreign_key = other.unpack_rkey(buffers.src_handle.packed_rkey)
        with pytest.raises(errors.InvalidArgumentError, match="another endpoint"):
            endpoint.get(buffers.dst_handle, [0], [buffers.src_handle.address], [1], foreign_key, Completion())
        if shm_context is not context:
            with shm_context.register(bytearray(16)) as foreign_handle:
                with pytest.raises(errors.InvalidArgumentError, match="another context"):
                    endpoint.get(foreign_handle, [0], [buffers.src_handle.address], [1], rkey, Completion())
    finally:
        other.close()


def test_closed_handle_or_key_is_refused(endpoint, context, buffers, rkey):
    handle = context.register(bytearray(16))
    handle.close()
    with pytest.raises(errors.InvalidArgumentError, match="closed"):
        endpoint.get(handle, [0], [buffers.src_handle.address], [1], rkey, Completion())
    key = endpoint.unpack_rkey(buffers.src_handle.packed_rkey)
    key.close()
    with pytest.raises(errors.InvalidArgumentError, match="closed"):
        endpoint.get(buffers.dst_handle, [0], [buffers.src_handle.address], [1], key, Completion())


def test_transfer_keeps_a_closed_handle_registered(endpoint, context, buffers, rkey):
    local = bytearray(8 << 20)
    handle = context.register(local)
    done = Completion()
    endpoint.get(handle, [0], [buffers.src_handle.address], [len(local)], rkey, done)
    handle.close()  # while the transfer may still be in flight
    assert done.wait() == (0, "")
    assert bytes(local[:1000]) == buffers.src[:1000].tobytes()
    local.extend(b"x")  # released once the transfer is done


def test_exception_in_callback_is_reported_and_progress_goes_on(endpoint, buffers, rkey, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    def bad_callback(status, message):
        raise RuntimeError("callback failure")

    endpoint.get(buffers.dst_handle, [0], [buffers.src_handle.address], [8], rkey, bad_callback)
    deadline = time.monotonic() + 10
    while not reported and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(reported[0].exc_value, RuntimeError)
    done = Completion()
    endpoint.get(buffers.dst_handle, [0], [buffers.src_handle.address], [8], rkey, done)
    assert done.wait() == (0, "")


async def test_cancelled_await_is_harmless(endpoint, buffers, rkey):
    task = asyncio.ensure_future(
        endpoint.get_async(buffers.dst_handle, [0], [buffers.src_handle.address], [16 << 20], rkey)
    )
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The transfer still completes in the background; later ones are unaffected.
    await endpoint.get_async(buffers.dst_handle, [0], [buffers.src_handle.address], [64], rkey)


def test_completion_after_the_loop_closed_is_ignored():
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    callback = _native._future_callback(loop, future)
    loop.close()
    callback(0, "")  # must not raise
    assert not future.done()


async def test_failure_statuses_become_exceptions():
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    _native._future_callback(loop, future)(-25, "get of 1 descriptors failed: Connection reset")
    with pytest.raises(_native.EndpointClosedError, match="Connection reset") as info:
        await future
    assert info.value.status == -25
