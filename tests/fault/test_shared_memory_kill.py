"""A client killed with SIGKILL in the middle of a batch over shared memory
(Client.allocate): the daemon keeps serving others, and neither arena space nor
a mapping of the dead client's memory stays behind."""

import subprocess
import sys
import textwrap
import time

import pytest

from kvstore.client import SyncClient
from tests.fault.support import emptied_stats

try:
    from kvstore import _native
    from kvstore._native.shared_memory import supported

    SHARED = _native.available() and supported()
except ImportError:
    SHARED = False

pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(not SHARED, reason="no native data plane or memfd")]

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from kvstore.client import Client

    async def main(address, mode):
        kv = Client(address, tenant="victim", transport="ucx")
        await kv.connect()
        region = kv.allocate(64 << 20)
        region.buffer[:] = bytes(range(256)) * (256 << 10)
        keys = [b"k%d" % i for i in range(16)]
        offsets = [i * (4 << 20) for i in range(16)]
        print("ready", region.shared.token, flush=True)
        n = 0
        while True:
            if mode == "put":
                await kv.put_from([k + b"-%d" % n for k in keys], region, offsets, [4 << 20] * 16)
            else:
                await kv.get_into(keys, region, offsets, [4 << 20] * 16)
            n += 1

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def client_mappings(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as maps:
        return [line for line in maps if "/memfd:kvstore-" in line]


def test_sigkilled_clients_leave_no_arena_space_and_no_mappings(daemon_process):
    proc = daemon_process("--memory", "512MiB").start()
    daemon_pid = proc.proc.pid
    with SyncClient(proc.address, tenant="victim", transport="ucx") as kv:
        kv.put_many([(b"k%d" % i, bytes([i]) * (4 << 20)) for i in range(16)])
    tokens = []
    for cycle in range(3):
        for mode in ("put", "get"):
            child = subprocess.Popen([sys.executable, "-c", WRITER, proc.address, mode], stdout=subprocess.PIPE, text=True)
            ready, token = child.stdout.readline().split()
            assert ready == "ready"
            tokens.append(token)
            time.sleep(0.3 + 0.1 * cycle)  # mid-batch
            child.kill()
            child.wait(10)
    # Others are served throughout.
    with SyncClient(proc.address, tenant="bystander", transport="ucx") as kv:
        kv.put(b"alive", b"yes")
        assert kv.get(b"alive") == b"yes"
        # The dead clients' memory is unmapped (their process exit drops their sessions).
        deadline = time.monotonic() + 10
        while any(t in line for line in client_mappings(daemon_pid) for t in tokens) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [line for line in client_mappings(daemon_pid) if any(t in line for t in tokens)]
        # And nothing they held stays allocated in the arena.
        stats = emptied_stats(kv, proc.address)
        assert stats["tiers"]["memory"]["blocks"] == 0
        assert stats["arena_used_bytes"] == 0
    assert proc.proc.poll() is None
