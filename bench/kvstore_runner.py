"""kvstore through its SDK: a real daemon as a subprocess, and the timed cases
(put with "disk" and "memory" durability, get) for one block size at a time."""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.measure import BenchError, Result, SizeRun
from bench.progress import Progress, quiet
from bench.report import size_label
from kvstore.client import Client

TENANT = "bench"
SUBTENANT = "default"
LISTENING = re.compile(r"listening on (\S+)")
# Every value starts with its own key in a field of this many bytes, so a get
# answered with another key's block cannot pass the comparison.
KEY_FIELD = 48
MIN_BLOCK_SIZE = 2 * KEY_FIELD


class Daemon:
    """``kvstore-server`` on a free 127.0.0.1 port, stopped with SIGTERM.

    Its stderr is drained by a thread for the whole run (a full pipe would
    stall the daemon's logging), keeping the last lines for error messages.
    """

    def __init__(self, data_dir: Path, memory: str | int, *, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.memory = str(memory)
        self.extra_args = extra_args
        self.address = ""
        self.returncode: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()
        self._drain: threading.Thread | None = None

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "kvstore.server",
            "--listen", "127.0.0.1:0",
            "--data-dir", str(self.data_dir),
            "--memory", self.memory,
            # The address is read from an INFO line; a KVSTORE_LOG_LEVEL in the environment must not hide it.
            "--log-level", "INFO",
            *self.extra_args,
        ]

    def start(self, timeout: float = 60) -> "Daemon":
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self._drain = threading.Thread(target=self._read_stderr, name="bench-daemon-log", daemon=True)
        self._drain.start()
        if not self._ready.wait(timeout) or not self.address:
            exited = self._proc.poll()
            self.stop(timeout=5)
            why = f"exited with status {exited}" if exited is not None else f"was not listening after {timeout:.0f} s"
            raise BenchError(f"kvstore-server {why}:\n{self.log_tail()}")
        return self

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self._log.append(line)
            if not self.address:
                match = LISTENING.search(line)
                if match:
                    self.address = match.group(1)
                    self._ready.set()
        self._ready.set()  # the daemon exited; start() reports it

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM, then wait for the drain (it flushes write-backs); SIGKILL past ``timeout``."""
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._drain is not None:
            self._drain.join(5)
        self.returncode = proc.returncode
        self._proc = None
        return self.returncode

    def log_tail(self, lines: int = 30) -> str:
        return "".join(list(self._log)[-lines:])

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class Values:
    """Block values: a few random bodies, each value prefixed with its own key."""

    def __init__(self, block_size: int, *, variants: int = 5, seed: int = 0) -> None:
        if block_size < MIN_BLOCK_SIZE:
            raise ValueError(f"block size {block_size} is below the {MIN_BLOCK_SIZE}-byte minimum of the bench")
        rng = np.random.default_rng(seed)
        self.block_size = block_size
        self._bodies = [rng.bytes(block_size - KEY_FIELD) for _ in range(variants)]

    def for_key(self, key: bytes, index: int) -> bytes:
        if len(key) > KEY_FIELD:
            raise ValueError(f"key {key!r} is longer than {KEY_FIELD} bytes")
        return key.ljust(KEY_FIELD, b"\0") + self._bodies[index % len(self._bodies)]


def key_for(case: str, block_size: int, index: int) -> bytes:
    return f"bench/{block_size}/{case}/{index:08d}".encode()


async def timed_puts(
    kv, case: str, keys: list[bytes], values: Values, durability: str, batch: int, progress: Progress
) -> Result:
    """put_many in batches, one call in flight; only the calls are timed."""
    latencies = []
    for start in range(0, len(keys), batch):
        items = [(key, values.for_key(key, start + j)) for j, key in enumerate(keys[start : start + batch])]
        began = time.perf_counter()
        stored = await kv.put_many(items, durability=durability)
        latencies.append(time.perf_counter() - began)
        if stored != len(items):
            raise BenchError(f"{case}: put_many stored {stored} of {len(items)} blocks")
        progress.advance(len(items) * values.block_size)
    return Result(case, values.block_size, len(keys), sum(latencies), latencies)


async def timed_gets(kv, keys: list[bytes], values: Values, batch: int, progress: Progress) -> Result:
    """get_many in batches; every returned block is compared with what was put."""
    size = values.block_size
    latencies = []
    for start in range(0, len(keys), batch):
        chunk = keys[start : start + batch]
        began = time.perf_counter()
        got = await kv.get_many(chunk)
        latencies.append(time.perf_counter() - began)
        if len(got) != len(chunk):
            raise BenchError(f"get_many returned {len(got)} results for {len(chunk)} keys")
        for j, (key, value) in enumerate(zip(chunk, got)):
            if value is None:
                raise BenchError(f"get missed {key!r}, which was just put")
            if len(value) != size:
                raise BenchError(f"get returned {len(value)} bytes for {key!r}; {size} were put")
            expected = values.for_key(key, start + j)
            if value != expected:
                raise BenchError(f"get returned different bytes for {key!r}: {describe_mismatch(value, expected)}")
        progress.advance(len(chunk) * size)
    return Result("get", size, len(keys), sum(latencies), latencies)


def describe_mismatch(got: bytes, expected: bytes) -> str:
    """Where two equal-length values first differ, and whose block ``got`` is if it is another key's."""
    differ = np.flatnonzero(np.frombuffer(got, dtype=np.uint8) != np.frombuffer(expected, dtype=np.uint8))
    where = f"first difference at byte {differ[0]} of {len(expected)}, {len(differ)} differing bytes"
    owner = bytes(got[:KEY_FIELD]).rstrip(b"\0")
    if differ[0] < KEY_FIELD and owner.startswith(b"bench/"):
        where += f"; it is the block of {owner!r}"
    return where


async def wait_for_disk_blocks(kv, expected: int, timeout: float) -> float | None:
    """Seconds until the daemon's disk tier holds ``expected`` blocks, or None on timeout.

    "memory" puts are acknowledged before their write-back to disk; waiting for
    it keeps that background work out of the next case's numbers."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        stats = await kv.server_stats()
        if stats["tiers"]["disk"]["blocks"] >= expected:
            return time.perf_counter() - began
        await asyncio.sleep(0.05)
    return None


async def run_size(kv, block_size: int, blocks: int, *, batch: int, progress: Progress | None = None) -> SizeRun:
    """put (disk), put (memory), then get of the put (disk) blocks; the namespace is emptied after."""
    progress = progress or quiet()
    label = size_label(block_size)
    values = Values(block_size)
    disk_keys = [key_for("disk", block_size, i) for i in range(blocks)]
    memory_keys = [key_for("memory", block_size, i) for i in range(blocks)]
    notes: list[str] = []
    before = await kv.server_stats()

    # One unmeasured block per kind of call first: channel setup and first-call costs stay out.
    for durability in ("disk", "memory"):
        warm = key_for(f"warm-{durability}", block_size, 0)
        await kv.put_many([(warm, values.for_key(warm, 0))], durability=durability)

    progress.stage(f"{label} put (disk)")
    put_disk = await timed_puts(kv, "put (disk)", disk_keys, values, "disk", batch, progress)
    progress.stage(f"{label} put (memory)")
    put_memory = await timed_puts(kv, "put (memory)", memory_keys, values, "memory", batch, progress)

    written = 2 * blocks + 2
    waited = await wait_for_disk_blocks(kv, before["tiers"]["disk"]["blocks"] + written, timeout=300)
    if waited is None:
        notes.append("put (memory): the write-back to disk had not finished 300 s after the last put; it overlapped the get case.")
    else:
        notes.append(
            "put (memory): acknowledged from the memory tier; the write-back to disk finished "
            f"{waited:.2f} s after the last put, before the get case."
        )

    stats = await kv.server_stats()
    memory = stats["tiers"]["memory"]
    evicted = stats["evictions"] - before["evictions"]
    resident = (
        f"the memory tier held {memory['blocks']} blocks "
        f"({size_label(memory['bytes'])} of {size_label(memory['capacity_bytes'])})"
    )
    if evicted == 0 and memory["blocks"] >= before["tiers"]["memory"]["blocks"] + written:
        notes.append(f"get: {resident} with no evictions, so every get was served from memory.")
    else:
        notes.append(f"get: {resident} after {evicted} evictions, so some gets read from disk.")

    if batch * block_size >= kv.config.max_batch_bytes:
        notes.append(
            f"put: each call of {batch} × {label} is split by the SDK into RPCs of at most "
            f"{size_label(kv.config.max_batch_bytes)} (max_batch_bytes), up to {kv.config.concurrency} in flight."
        )

    await kv.get_many(disk_keys[:1])
    progress.stage(f"{label} get")
    get = await timed_gets(kv, disk_keys, values, batch, progress)

    await kv.drop_namespace()  # each block size starts from an empty memory tier
    return SizeRun(block_size, [put_disk, put_memory, get], notes)


async def run_sizes(
    address: str, sizes: list[int], blocks: dict[int, int], *, batch: int, progress: Progress | None = None
) -> list[SizeRun]:
    async with Client(address, tenant=TENANT, subtenant=SUBTENANT) as kv:
        await kv.drop_namespace()
        return [await run_size(kv, size, blocks[size], batch=batch, progress=progress) for size in sizes]
