"""A client killed with SIGKILL in the middle of a zero-copy batch: the daemon
keeps serving others and every arena byte the dead client held is released."""

import subprocess
import sys
import textwrap
import time

import pytest

from kvstore.client import SyncClient
from tests.fault.support import emptied_stats

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
        if mode == "put":
            kv.put_from([k + b"-%d" % n for k in keys], region, offsets, [4 << 20] * 16)
        else:
            kv.get_into(keys, region, offsets, [4 << 20] * 16)
        n += 1
    """
)


@pytest.mark.parametrize("tls", ["shm,tcp", "tcp"])
def test_sigkilled_clients_leak_nothing(daemon_process, tls):
    proc = daemon_process("--memory", "512MiB", "--ucx-tls", tls).start()
    with SyncClient(proc.address, tenant="victim", transport="ucx", ucx_tls=tls) as kv:
        kv.put_many([(b"k%d" % i, bytes([i]) * (4 << 20)) for i in range(16)])
    for cycle in range(3):
        for mode in ("put", "get"):
            child = subprocess.Popen(
                [sys.executable, "-c", WRITER, proc.address, mode, tls], stdout=subprocess.PIPE, text=True
            )
            assert child.stdout.readline().strip() == "ready"
            time.sleep(0.3 + 0.1 * cycle)  # mid-batch: batches of 64 MiB take longer than this
            child.kill()
            child.wait(10)
    # Others are served throughout, and nothing the dead clients held stays allocated.
    with SyncClient(proc.address, tenant="bystander", transport="ucx", ucx_tls=tls) as kv:
        kv.put(b"alive", b"yes")
        assert kv.get(b"alive") == b"yes"
        stats = emptied_stats(kv, proc.address)
        assert stats["tiers"]["memory"]["blocks"] == 0
        assert stats["arena_used_bytes"] == 0
