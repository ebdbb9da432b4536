"""A client killed with SIGKILL in the middle of a zero-copy batch: the daemon
keeps serving others and every arena byte the dead client held is released."""

import subprocess
import sys
import textwrap
import time

import pytest

from kvstore.client import SyncClient
from tests.conftest import free_port
from tests.fault.support import emptied_stats, metric

try:
    from kvstore import _native

    NATIVE = _native.available()
except ImportError:
    NATIVE = False

pytestmark = pytest.mark.skipif(not NATIVE, reason="the native data plane is not built")

WRITER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from kvstore.client import SyncClient
    address, mode, tls = sys.argv[1], sys.argv[2], sys.argv[3]
    kv = SyncClient(address, tenant="victim", transport="ucx", ucx_tls=tls)
    buf = np.frombuffer(os.urandom(64 << 20), dtype=np.uint8).copy()
    region = kv.register(buf)
    keys = [b"k%d" % i for i in range(16)]
    offsets = [i * (4 << 20) for i in range(16)]
    print("ready", flush=True)
    n = 0
    while True:
        print("start", n, flush=True)  # the batch is sent after this line, and returns before "done"
        if mode == "put":
            kv.put_from([k + b"-%d" % n for k in keys], region, offsets, [4 << 20] * 16)
        else:
            kv.get_into(keys, region, offsets, [4 << 20] * 16)
        print("done", n, flush=True)
        n += 1
    """
)


def in_flight(metrics_port: int, predicate, what: str, timeout: float = 10.0) -> None:
    """Poll the daemon's kvstore_requests_in_flight until ``predicate`` holds for it."""
    deadline = time.monotonic() + timeout
    while not predicate(metric(metrics_port, "kvstore_requests_in_flight")):
        assert time.monotonic() < deadline, f"{what} after {timeout} s"
        time.sleep(0.01)


def kill_mid_batch(address: str, mode: str, tls: str, metrics_port: int, delay: float, attempts: int = 5) -> None:
    """Start a writer, and SIGKILL it once it has a batch under way: the daemon
    serves a request (the writer is its only client) and the writer has said
    "start" for a batch it has not said "done" for. What the writer printed up
    to its death shows the kill landed inside that batch; a kill that fell in
    the few microseconds between two batches is tried again with a new writer."""
    landed = []
    for _ in range(attempts):
        in_flight(metrics_port, lambda n: n == 0, "the daemon still serves a request of an earlier writer")
        child = subprocess.Popen([sys.executable, "-c", WRITER, address, mode, tls], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(delay)
            in_flight(metrics_port, lambda n: n >= 1 or child.poll() is not None, f"the {mode} writer has no request under way")
            assert child.poll() is None, f"the {mode} writer exited with {child.returncode}"
        finally:
            child.kill()
            child.wait(10)
        lines = child.stdout.read().split()  # what it printed after "ready", up to its death
        child.stdout.close()
        assert lines and lines[0] == "start", f"the {mode} writer never started a batch: {lines[-6:]}"
        landed.append(lines[-2:])
        if lines[-2] == "start":
            return
    raise AssertionError(f"no kill of the {mode} writer landed inside a batch in {attempts} tries: {landed}")


@pytest.mark.parametrize("tls", ["shm,tcp", "tcp"])
def test_sigkilled_clients_leak_nothing(daemon_process, tls):
    metrics_port = free_port()
    proc = daemon_process("--memory", "512MiB", "--ucx-tls", tls, "--metrics-port", str(metrics_port)).start()
    with SyncClient(proc.address, tenant="victim", transport="ucx", ucx_tls=tls) as kv:
        kv.put_many([(b"k%d" % i, bytes([i]) * (4 << 20)) for i in range(16)])
    for cycle in range(3):
        for mode in ("put", "get"):
            kill_mid_batch(proc.address, mode, tls, metrics_port, delay=0.3 + 0.1 * cycle)
    # Others are served throughout, and nothing the dead clients held stays allocated.
    with SyncClient(proc.address, tenant="bystander", transport="ucx", ucx_tls=tls) as kv:
        kv.put(b"alive", b"yes")
        assert kv.get(b"alive") == b"yes"
        stats = emptied_stats(kv, proc.address)
        assert stats["tiers"]["memory"]["blocks"] == 0
        assert stats["arena_used_bytes"] == 0
