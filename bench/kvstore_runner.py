"""kvstore through its SDK: one real daemon as a subprocess for every kvstore
case, its three client paths, and the admin calls the bench makes between
cases (statistics, waiting for write-back, emptying the namespace).

The client paths (each a ``Client`` per bench client process, bench.workers):

  zero-copy (shm)  transport "ucx", ucx_tls "shm,tcp", buffers from Client.allocate:
                   shared memory the co-located daemon maps; it copies each block
                   between that memory and its arena with one memcpy; put_from /
                   get_into
  zero-copy (engine memory)
                   transport "ucx", ucx_tls "shm,tcp", buffers the caller allocated
                   (numpy, as an engine's KV pool) and registered: the co-located
                   daemon copies each block between the client's process and its
                   arena itself (process_vm_readv/writev), hashing as it copies;
                   put_from / get_into
  zero-copy (tcp)  transport "ucx", ucx_tls "tcp": the same calls, every byte over
                   UCX's TCP transport (the daemon reaches this client over TCP only)
  inline           transport "inline": values inside the gRPC messages; put_many /
                   get_many (what a client without the native module does)
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from bench.measure import BenchError
from bench.workers import MIN_BLOCK_SIZE  # noqa: F401  (re-exported: the bench's smallest block)
from kvstore.harness.daemon import DaemonProcess
from kvstore.harness.process import HarnessError

TENANT = "bench"
SUBTENANT = "default"
# The daemon's zero-copy data plane offers both; each client's ucx_tls picks its path.
DAEMON_UCX_TLS = "shm,tcp"

# mode -> (system name in the report, key tag)
MODES = {
    "shm": ("kvstore zero-copy (shm)", "zcshm"),
    "engine": ("kvstore zero-copy (engine memory)", "zceng"),
    "tcp": ("kvstore zero-copy (tcp)", "zctcp"),
    "inline": ("kvstore inline", "inline"),
}


def start_daemon(data_dir: Path, memory: str | int, *args: str) -> DaemonProcess:
    """``kvstore-server`` on a free 127.0.0.1 port (a kvstore.harness DaemonProcess, its
    output kept in memory), ready to serve; BenchError with its log if it does not start.
    Stop it with ``stop(120)``: SIGTERM, then the drain (it flushes write-backs)."""
    daemon = DaemonProcess(
        data_dir,
        "--memory", str(memory),
        # INFO lines in the log tail a failed run prints, whatever KVSTORE_LOG_LEVEL says.
        "--log-level", "INFO",
        *args,
        die_with_parent=True,
    )  # fmt: skip
    try:
        return daemon.start(timeout=60)
    except HarnessError as exc:
        raise BenchError(f"kvstore-server did not start: {exc}") from None


class Admin:
    """The bench's own calls to the daemon between cases, each on a short-lived inline client."""

    def __init__(self, address: str) -> None:
        self.address = address

    def _call(self, fn):
        from kvstore.client import Client

        async def go():
            async with Client(self.address, tenant=TENANT, subtenant=SUBTENANT, transport="inline") as kv:
                return await fn(kv)

        return asyncio.run(go())

    def stats(self) -> dict:
        return self._call(lambda kv: kv.server_stats())

    def drop(self) -> None:
        self._call(lambda kv: kv.drop_namespace())

    def wait_resident(self, timeout: float = 300) -> float | None:
        """Seconds until the daemon's arena is prefaulted (it is, in the background, after
        start), or None on timeout: that first touch of the memory tier is start-up work,
        and taking the page faults and the process's mmap lock would slow whichever cases
        overlapped it (the limit cases included)."""

        async def wait(kv):
            began = time.perf_counter()
            while time.perf_counter() - began < timeout:
                memory = (await kv.server_stats())["tiers"]["memory"]
                if memory["resident_bytes"] >= memory["capacity_bytes"]:
                    return time.perf_counter() - began
                await asyncio.sleep(0.1)
            return None

        return self._call(wait)

    def settle(self, expected: int, timeout: float = 300) -> float | None:
        """Wait for the daemon's write-back (``wait_for_disk_blocks``), then for the kernel to
        write the dirty page cache out (``sync``): one case's disk writes must not slow the next
        (measured here: a backlog of dirty pages made later write-backs, and so puts, 5x slower).
        Seconds until the disk tier held ``expected`` blocks, or None on timeout."""
        waited = self.wait_for_disk_blocks(expected, timeout)
        os.sync()
        return waited

    def wait_for_disk_blocks(self, expected: int, timeout: float = 300) -> float | None:
        """Seconds until the disk tier holds ``expected`` blocks, or None on timeout.

        "memory" puts are acknowledged before their write-back to disk; waiting for
        it keeps that background work out of the next case's numbers."""

        async def wait(kv):
            began = time.perf_counter()
            while time.perf_counter() - began < timeout:
                stats = await kv.server_stats()
                if stats["tiers"]["disk"]["blocks"] >= expected:
                    return time.perf_counter() - began
                await asyncio.sleep(0.05)
            return None

        return self._call(wait)
