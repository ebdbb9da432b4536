"""Worker: its address, its progress thread (sleeps when idle, wakes for new
work, stops on close), and close() failing what is still pending."""

from __future__ import annotations

import gc
import os
import signal
import time

import numpy as np
import pytest

from kvstore import _native, errors
from tests.native.support import Completion

pytestmark = pytest.mark.timeout(60)


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_address(shm_context):
    with _native.Worker(shm_context) as a, _native.Worker(shm_context) as b:
        assert isinstance(a.address, bytes) and a.address
        assert a.address != b.address


def test_close_is_idempotent_and_stops_the_thread(shm_context):
    before = native_threads()
    worker = _native.Worker(shm_context)
    assert native_threads() == before + 1
    assert not worker.closed
    worker.close()
    worker.close()
    assert worker.closed
    assert native_threads() == before


def test_dropped_workers_are_closed(shm_context):
    before = native_threads()
    workers = [_native.Worker(shm_context) for _ in range(4)]
    endpoints = [w.connect(w.address) for w in workers]
    del workers, endpoints
    gc.collect()
    assert native_threads() == before


def test_closed_worker_refuses_work(shm_context):
    worker = _native.Worker(shm_context)
    endpoint = worker.connect(worker.address)
    buffer = np.zeros(64, dtype=np.uint8)
    handle = shm_context.register(buffer)
    rkey = endpoint.unpack_rkey(handle.packed_rkey)
    worker.close()
    assert endpoint.closed
    with pytest.raises(_native.EndpointClosedError):
        worker.connect(worker.address)
    with pytest.raises(_native.EndpointClosedError):
        endpoint.get(handle, [0], [handle.address], [8], rkey, Completion())
    with pytest.raises(_native.EndpointClosedError):
        endpoint.unpack_rkey(handle.packed_rkey)
    rkey.close()
    handle.close()


def test_idle_workers_sleep(shm_context):
    workers = [_native.Worker(shm_context) for _ in range(3)]
    time.sleep(0.05)
    start = time.process_time()
    time.sleep(0.5)
    used = time.process_time() - start
    for worker in workers:
        worker.close()
    assert used < 0.15, f"3 idle workers used {used:.3f} s of CPU in 0.5 s"


@pytest.mark.parametrize("busy_poll_us", [0, 50])
def test_sleeping_worker_wakes_for_new_work(shm_context, busy_poll_us):
    buffer = np.arange(256, dtype=np.uint8)
    with _native.Worker(shm_context, busy_poll_us=busy_poll_us, wait_timeout_ms=1000) as worker:
        endpoint = worker.connect(worker.address)
        with shm_context.register(buffer) as handle, endpoint.unpack_rkey(handle.packed_rkey) as rkey:
            for _ in range(5):
                time.sleep(0.05)  # long enough for the thread to go to sleep
                done = Completion()
                start = time.monotonic()
                endpoint.get(handle, [128], [handle.address], [128], rkey, done)
                assert done.wait() == (0, "")
                # Woken by the post, not by the 1 s safety-net timeout.
                assert time.monotonic() - start < 0.5


def test_bad_progress_options(shm_context):
    with pytest.raises(errors.InvalidArgumentError):
        _native.Worker(shm_context, busy_poll_us=-1)
    with pytest.raises(errors.InvalidArgumentError):
        _native.Worker(shm_context, wait_timeout_ms=0)


def test_close_from_a_completion_callback(shm_context):
    worker = _native.Worker(shm_context)
    endpoint = worker.connect(worker.address)
    buffer = np.zeros(64, dtype=np.uint8)
    handle = shm_context.register(buffer)
    rkey = endpoint.unpack_rkey(handle.packed_rkey)
    done = Completion()

    def close_then_report(status, message):
        worker.close()  # on the progress thread itself
        done(status, message)

    endpoint.get(handle, [0], [handle.address + 32], [32], rkey, close_then_report)
    assert done.wait() == (0, "")
    deadline = time.monotonic() + 5
    while not worker.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.closed


def _wait_stopped(pid: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                states.append(stat.read().rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t") for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def test_close_fails_pending_transfers(shm_context, start_peer):
    # Over TCP a read is served by the peer's progress thread; a stopped peer
    # leaves it pending until our close() cancels it.
    context = _native.Context("tcp", settings={"NET_DEVICES": "lo"})
    peer = start_peer("tcp", 1 << 20)
    worker = _native.Worker(context)
    endpoint = worker.connect(peer.address)
    rkey = endpoint.unpack_rkey(peer.rkey)
    local = np.zeros(1 << 20, dtype=np.uint8)
    handle = context.register(local)
    done = Completion()
    endpoint.get(handle, [0], [peer.buffer], [4096], rkey, Completion())  # wire up while running
    os.kill(peer.proc.pid, signal.SIGSTOP)
    _wait_stopped(peer.proc.pid)  # kill() returns before every thread of the peer has stopped
    try:
        endpoint.get(handle, [0], [peer.buffer], [1 << 20], rkey, done)
        time.sleep(0.2)
        assert done.calls == []  # stuck behind the stopped peer
        worker.close()
        status, message = done.wait(timeout=5)
        assert isinstance(_native.error_for_status(status, message), _native.EndpointClosedError)
    finally:
        os.kill(peer.proc.pid, signal.SIGCONT)
