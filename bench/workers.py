"""Client processes: every timed case runs in 1..N worker processes at once.

A ``WorkerPool`` spawns N processes once and drives them over pipes. Each
worker opens one *driver* at a time (a kvstore ``Client``, a peer's client, or
one of the machine limits), allocates its own buffers for a block size, and
runs cases on command:

    pool = WorkerPool(4, levels=(1, 4))
    pool.open({"kind": "kvstore", "address": "127.0.0.1:7600", "mode": "shm"})
    pool.prepare(block_size, batch=32, dst_blocks=[...])   # buffers, registered once
    result = pool.run(Case("kvstore zero-copy (shm)", "put", ...))   # -> Result
    pool.shutdown()

A case with concurrency c runs in workers 0..c-1. Each prepares everything it
can before a shared barrier (``multiprocessing.Barrier``); after it, each
times its calls one by one. The Result's seconds are from the earliest barrier
release to the last worker's finish (aggregate GB/s = all bytes over that wall
time), and its latencies are every call of every worker.

Byte-exactness: every value starts with its own key (a 48-byte field), so a
block answered for another key cannot pass; a get's destination is zeroed
before the barrier and every block of it is compared after the timed calls.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.measure import BenchError, Result

KEY_FIELD = 48
MIN_BLOCK_SIZE = 2 * KEY_FIELD
BARRIER_TIMEOUT = 600.0
PUT_OPS = ("put", "put (disk)")


@dataclass(frozen=True)
class Case:
    """One timed case: ``calls`` calls of ``batch`` blocks in each of ``concurrency`` workers.

    ``keys`` names the blocks: a get reads the blocks of the put case whose
    ``keys`` it repeats (same block size, concurrency and worker)."""

    system: str
    op: str  # "put", "put (disk)", "get", "copy" (memcpy), "send" (loopback TCP)
    tag: str  # short system tag for keys
    block_size: int
    batch: int
    calls: int  # per worker
    concurrency: int
    keys: str
    durability: str = "memory"

    @property
    def label(self) -> str:
        return f"{self.system} {self.op}"


def block_key(case: Case, worker: int, call: int, slot: int) -> bytes:
    key = f"b/{case.block_size}/{case.tag}/{case.keys}/c{case.concurrency}w{worker}/{call:05d}.{slot:03d}".encode()
    if len(key) > KEY_FIELD:
        raise BenchError(f"key {key!r} is longer than the {KEY_FIELD}-byte key field")
    return key


class BlockValues:
    """Block values: a key field, then one of a few random bodies (chosen by the slot in the batch)."""

    def __init__(self, block_size: int, *, variants: int = 4, seed: int = 0) -> None:
        if block_size < MIN_BLOCK_SIZE:
            raise BenchError(f"block size {block_size} is below the {MIN_BLOCK_SIZE}-byte minimum of the bench")
        rng = np.random.default_rng(seed)
        self.block_size = block_size
        self.bodies = [np.frombuffer(rng.bytes(block_size - KEY_FIELD), dtype=np.uint8) for _ in range(variants)]

    @staticmethod
    def key_field(key: bytes) -> np.ndarray:
        return np.frombuffer(key.ljust(KEY_FIELD, b"\0"), dtype=np.uint8)

    def block(self, buf: np.ndarray, slot: int) -> np.ndarray:
        return buf[slot * self.block_size : (slot + 1) * self.block_size]

    def fill(self, buf: np.ndarray, slots: int) -> None:
        """Bodies into every slot of a put buffer (once per block size)."""
        for slot in range(slots):
            self.block(buf, slot)[KEY_FIELD:] = self.bodies[slot % len(self.bodies)]

    def stamp(self, buf: np.ndarray, keys: list[bytes]) -> None:
        """Each key into the key field of its slot (before each put call: 48 bytes per block)."""
        for slot, key in enumerate(keys):
            self.block(buf, slot)[:KEY_FIELD] = self.key_field(key)

    def check(self, got: np.ndarray, key: bytes, slot: int) -> str | None:
        """None when ``got`` is this key's value, else where it differs."""
        body = self.bodies[slot % len(self.bodies)]
        head_ok = np.array_equal(got[:KEY_FIELD], self.key_field(key))
        if head_ok and np.array_equal(got[KEY_FIELD:], body):
            return None
        expected = np.concatenate([self.key_field(key), body])
        differ = np.flatnonzero(got != expected)
        where = f"first difference at byte {differ[0]} of {len(expected)}, {len(differ)} differing bytes"
        owner = bytes(got[:KEY_FIELD]).rstrip(b"\0")
        if not head_ok and owner.startswith(b"b/"):
            where += f"; it is the block of {owner!r}"
        return where


# -- drivers (they live in the worker processes) ---------------------------------------


class Driver:
    """One system's client in a worker: buffers for a block size, and the timed calls."""

    def __init__(self, spec: dict, worker: int) -> None:
        self.spec = spec
        self.worker = worker
        self.values: BlockValues | None = None
        self.src: np.ndarray | None = None  # one batch: put source (stamped with keys per call)
        self.dst: np.ndarray | None = None  # every block a get case reads, in call order

    def describe(self) -> str:
        return ""

    def settings(self) -> dict:
        """The client's settings as data (after ``prepare``: its buffers' too)."""
        return {}

    def prepare(self, block_size: int, batch: int, dst_blocks: int) -> None:
        raise NotImplementedError

    def put(self, keys: list[bytes], durability: str) -> int:
        raise NotImplementedError

    def get(self, keys: list[bytes], dst_offset: int) -> list:
        """Per key: bytes written into ``dst`` at ``dst_offset + slot * block_size`` (int), the value
        itself (bytes, for APIs that return values), or None for a miss."""
        raise NotImplementedError

    def _buffers(self, block_size: int, batch: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Take the put and get buffers of a block size; every put slot gets its body once."""
        self.values = BlockValues(block_size)
        self.size, self.batch = block_size, batch
        self.src, self.dst = src, dst
        self.values.fill(src, batch)

    def release(self) -> None:
        self.src = self.dst = None

    def clear(self) -> None:
        pass

    def close(self) -> None:
        self.release()


class KvstoreDriver(Driver):
    """The kvstore SDK: ``mode`` "shm" or "tcp" is the zero-copy path (transport "ucx",
    ``ucx_tls`` "shm,tcp" or "tcp") with ``put_from``/``get_into``: "shm" on memory the SDK
    allocated (``Client.allocate``: shared with the co-located daemon, which copies with
    memcpy), "engine" on registered numpy buffers to the same co-located daemon (memory an
    inference engine allocated itself: the daemon copies it from and into the client's
    process with process_vm_readv/writev), "tcp" on
    registered numpy buffers (the daemon's RMA over UCX's TCP transport);
    "inline" is transport "inline" with ``put_many``/``get_many`` (values in gRPC messages);
    "auto" is the SDK's default transport with ``put_from``/``get_into`` on memory from
    ``Client.allocate`` (registered numpy buffers without the native module).

    ``spec["address"]`` is one daemon's address or a cluster's list of them; with
    ``spec["warm_batch"]`` the unmeasured warm-up is a whole batch, spread over every
    daemon of a cluster, so that each has mapped this client's memory before the timed calls."""

    TLS = {"shm": "shm,tcp", "engine": "shm,tcp", "tcp": "tcp"}

    def __init__(self, spec, worker):
        super().__init__(spec, worker)
        import asyncio

        from kvstore.client import Client

        self.mode = spec["mode"]
        settings: dict[str, Any] = {}
        if spec.get("max_batch_bytes"):
            settings["max_batch_bytes"] = spec["max_batch_bytes"]
        if self.mode == "inline":
            settings["transport"] = "inline"
        elif self.mode != "auto":
            settings.update(transport="ucx", ucx_tls=self.TLS[self.mode])
        self.loop = asyncio.new_event_loop()
        self.client = Client(spec["address"], tenant=spec["tenant"], subtenant=spec["subtenant"], **settings)
        self.loop.run_until_complete(self.client.connect())
        if self.mode in self.TLS and not self.client.zero_copy:
            raise BenchError(f"kvstore {self.mode}: the client has no zero-copy data plane")
        self.regions: list = []
        self.src_region = self.dst_region = None

    def describe(self):
        c = self.client.config
        return (
            f"transport {c.transport}, ucx_tls {c.ucx_tls or '-'}, zero_copy {self.client.zero_copy}, "
            f"max_batch_bytes {c.max_batch_bytes >> 20} MiB, concurrency {c.concurrency}"
        )

    def settings(self):
        c = self.client.config
        return {
            "zero_copy": bool(self.client.zero_copy),
            "transport": c.transport,
            "ucx_tls": c.ucx_tls,
            "shared_memory_buffers": getattr(self.src_region, "shared", None) is not None,
            "max_batch_bytes": c.max_batch_bytes,
            "concurrency": c.concurrency,
        }

    def _run(self, coro):
        return self.loop.run_until_complete(coro)

    def _allocate(self, nbytes: int):
        """Memory the SDK allocates (Client.allocate): shared with the co-located daemon, which
        copies each block with one memcpy, as Mooncake's shm client buffers are. None where
        "auto" finds no native module to allocate with."""
        try:
            return self.client.allocate(nbytes)
        except ImportError:
            if self.mode != "auto":
                raise
            return None

    def prepare(self, block_size, batch, dst_blocks):
        src_region = dst_region = None
        if self.mode in ("shm", "auto"):
            src_region, dst_region = self._allocate(batch * block_size), self._allocate(dst_blocks * block_size)
        if src_region is not None:
            self.src_region, self.dst_region = src_region, dst_region
            self.regions = [self.src_region, self.dst_region]
            src = np.frombuffer(self.src_region.buffer, dtype=np.uint8)
            dst = np.frombuffer(self.dst_region.buffer, dtype=np.uint8)
            dst[:] = 0
        else:
            src = np.empty(batch * block_size, dtype=np.uint8)
            dst = np.zeros(dst_blocks * block_size, dtype=np.uint8)
        self._buffers(block_size, batch, src, dst)
        self.src_blocks = [self.values.block(self.src, j) for j in range(batch)]
        if self.mode != "inline" and src_region is None:
            self.src_region = self.client.register(self.src)
            self.dst_region = self.client.register(self.dst)
            self.regions = [self.src_region, self.dst_region]
        if self.mode != "inline":
            self.put_offsets = [j * block_size for j in range(batch)]
        # An unmeasured call per kind: first-call costs (rkey unpacking, lazy mappings) stay out.
        width = batch if self.spec.get("warm_batch") else 1
        for durability in ("memory", "disk"):
            warm = [f"warm/{block_size}/{self.mode}/{durability}/w{self.worker}/{j}".encode() for j in range(width)]
            self.values.stamp(self.src, warm)
            self.put(warm, durability)
            missing = [key for key, got in zip(warm, self.get(warm, 0)) if got is None]
            if missing:
                raise BenchError(f"kvstore {self.mode}: the warm-up block {missing[0]!r} was not found")

    def put(self, keys, durability):
        n = len(keys)
        if self.mode == "inline":
            return self._run(self.client.put_many(list(zip(keys, self.src_blocks[:n])), durability=durability))
        return self._run(
            self.client.put_from(keys, self.src_region, self.put_offsets[:n], [self.size] * n, durability=durability)
        )

    def get(self, keys, dst_offset):
        if self.mode == "inline":
            return self._run(self.client.get_many(keys))
        offsets = [dst_offset + j * self.size for j in range(len(keys))]
        return self._run(self.client.get_into(keys, self.dst_region, offsets, [self.size] * len(keys)))

    def release(self):
        self.src_blocks = []
        super().release()  # the arrays first: an allocated region cannot close under views of it
        for region in self.regions:
            region.close()
        self.regions = []
        self.src_region = self.dst_region = None

    def close(self):
        self.release()
        self._run(self.client.close())
        self.loop.close()


class PeerDriver(Driver):
    """A peer's client attached to servers the parent started (bench.peers.attach)."""

    def __init__(self, spec, worker):
        super().__init__(spec, worker)
        from bench.peers import attach

        self.peer = attach(spec["client"])
        self.peer.start()
        self.views: list[memoryview] = []

    def describe(self):
        return self.peer.name

    def prepare(self, block_size, batch, dst_blocks):
        src_view = self.peer.alloc(batch * block_size)
        dst_view = self.peer.alloc(dst_blocks * block_size)
        self.views = [src_view, dst_view]
        self._buffers(block_size, batch, np.frombuffer(src_view, dtype=np.uint8), np.frombuffer(dst_view, dtype=np.uint8))
        self.dst[:] = 0
        self.src_blocks = [src_view[j * block_size : (j + 1) * block_size] for j in range(batch)]
        self.dst_view = dst_view
        # One unmeasured block put and read back: connection setup and lazy mappings stay out.
        warm = f"warm/{block_size}/w{self.worker}".encode()
        self.values.stamp(self.src, [warm])
        self.put([warm], "memory")
        if self.get([warm], 0)[0] is None:
            raise BenchError(f"{self.peer.name}: the warm-up block {warm!r} was not found")

    def put(self, keys, durability):
        self.peer.put_batch(keys, self.src_blocks[: len(keys)])
        return len(keys)

    def get(self, keys, dst_offset):
        out = [self.dst_view[dst_offset + j * self.size : dst_offset + (j + 1) * self.size] for j in range(len(keys))]
        sizes = self.peer.get_batch(keys, out)
        del out
        return [None if n < 0 else n for n in sizes]

    def release(self):
        self.src_blocks = []
        self.dst_view = None
        self.src = self.dst = None
        for view in self.views:
            self.peer.free(view)
        self.views = []

    def clear(self):
        self.peer.clear()

    def close(self):
        self.release()
        self.peer.stop()


def _driver_class(kind: str):
    if kind in ("memcpy", "tcp"):
        from bench.limits import MemcpyDriver, TcpDriver

        return {"memcpy": MemcpyDriver, "tcp": TcpDriver}[kind]
    return {"kvstore": KvstoreDriver, "peer": PeerDriver}[kind]


# -- one case in one worker ----------------------------------------------------------------


def run_case(driver: Driver, case: Case, barrier) -> dict:
    size, batch = case.block_size, case.batch
    if case.op == "send":
        started, finished, latencies = driver.stream(case.calls, barrier)
        return {"t0": started, "t1": finished, "latencies": latencies, "blocks": case.calls * batch}

    keys = [[block_key(case, driver.worker, c, j) for j in range(batch)] for c in range(case.calls)]
    latencies: list[float] = []
    if case.op == "copy":
        if barrier is not None:
            barrier.wait(BARRIER_TIMEOUT)
        started = time.perf_counter()
        for _ in range(case.calls):
            began = time.perf_counter()
            driver.copy()
            latencies.append(time.perf_counter() - began)
        finished = time.perf_counter()
        if not np.array_equal(driver.dst, driver.src):
            raise BenchError("memcpy produced different bytes")
    elif case.op in PUT_OPS:
        if barrier is not None:
            barrier.wait(BARRIER_TIMEOUT)
        started = time.perf_counter()
        for call in keys:
            driver.values.stamp(driver.src, call)  # 48 bytes per block, outside the timed call
            began = time.perf_counter()
            stored = driver.put(call, case.durability)
            latencies.append(time.perf_counter() - began)
            if stored != len(call):
                raise BenchError(f"{case.label}: a put stored {stored} of {len(call)} blocks")
        finished = time.perf_counter()
    elif case.op == "get":
        span = case.calls * batch * size
        if span > len(driver.dst):
            raise BenchError(f"{case.label}: {span} bytes to read but a {len(driver.dst)}-byte destination")
        driver.dst[:span] = 0  # a get that writes nothing cannot pass
        results = []
        if barrier is not None:
            barrier.wait(BARRIER_TIMEOUT)
        started = time.perf_counter()
        for c, call in enumerate(keys):
            began = time.perf_counter()
            results.append(driver.get(call, c * batch * size))
            latencies.append(time.perf_counter() - began)
        finished = time.perf_counter()
        verify(driver, case, keys, results)
    else:
        raise BenchError(f"unknown op {case.op!r}")
    return {"t0": started, "t1": finished, "latencies": latencies, "blocks": case.calls * batch}


def verify(driver: Driver, case: Case, keys: list[list[bytes]], results: list[list]) -> None:
    """Every block a get returned, compared with what was put under its key."""
    size = case.block_size
    values = driver.values
    for c, (call, got) in enumerate(zip(keys, results)):
        if len(got) != len(call):
            raise BenchError(f"{case.label}: {len(got)} results for {len(call)} keys")
        for j, (key, result) in enumerate(zip(call, got)):
            if result is None:
                raise BenchError(f"{case.label}: get missed {key!r}, which was just put")
            if isinstance(result, int):
                if result != size:
                    raise BenchError(f"{case.label}: get wrote {result} bytes for {key!r}; {size} were put")
                start = (c * case.batch + j) * size
                block = driver.dst[start : start + size]
            else:
                if len(result) != size:
                    raise BenchError(f"{case.label}: get returned {len(result)} bytes for {key!r}; {size} were put")
                block = np.frombuffer(result, dtype=np.uint8)
            problem = values.check(block, key, j)
            if problem:
                raise BenchError(f"{case.label}: get returned different bytes for {key!r}: {problem}")


# -- the worker process ------------------------------------------------------------------


def serve_commands(conn, handle, barriers, close) -> None:  # pragma: no cover - runs in a child
    """The loop of a bench client process: answer each (command, arg) from the parent with
    ("ok", ``handle(command, arg)``) or ("error", why), until "exit" or a closed pipe; then
    ``close()``. A failure aborts ``barriers``, so that siblings waiting there fail instead
    of hanging."""
    conn.send(("ok", os.getpid()))
    while True:
        try:
            command, arg = conn.recv()
        except (EOFError, OSError):
            break
        if command == "exit":
            conn.send(("ok", None))
            break
        try:
            conn.send(("ok", handle(command, arg)))
        except BaseException as exc:  # the parent raises it
            for barrier in barriers:
                barrier.abort()
            # The bench's and kvstore's own errors say what went wrong; anything else gets its traceback.
            if isinstance(exc, BenchError) or type(exc).__module__.startswith("kvstore"):
                text = f"{type(exc).__name__}: {exc}"
            else:
                text = "".join(traceback.format_exception(exc)).rstrip()
            conn.send(("error", text))
    try:
        close()
    except Exception:
        pass


def _worker_main(index: int, conn, barriers: dict) -> None:  # pragma: no cover - runs in a child
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops the pool
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    driver: Driver | None = None

    def handle(command: str, arg: Any) -> Any:
        nonlocal driver
        if command == "open":
            close()
            driver = _driver_class(arg["kind"])(arg, index)
            return driver.describe()
        if command == "settings":
            return driver.settings()
        if command == "prepare":
            driver.release()
            driver.prepare(*arg)
        elif command == "run":
            return run_case(driver, arg, barriers.get(arg.concurrency))
        elif command == "clear":
            driver.clear()
        elif command == "close":
            close()
        else:
            raise BenchError(f"unknown command {command!r}")
        return None

    def close() -> None:
        nonlocal driver
        if driver is not None:
            closing, driver = driver, None
            closing.close()

    serve_commands(conn, handle, barriers.values(), close)


def collect_replies(conns, procs, workers, what: str, timeout: float = 1800) -> tuple[list, list[str]]:
    """One ("ok" | "error", reply) from each client process of ``workers``, waiting
    for each; BenchError if one dies or stays silent. Returns the replies and the
    error messages of those that failed."""
    replies, errors = [], []
    for i in workers:
        conn, proc = conns[i], procs[i]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise BenchError(f"client process {i} died (exit status {proc.exitcode}) during {what}")
            if time.monotonic() > deadline:
                raise BenchError(f"client process {i} did not answer {what} within {timeout:.0f} s")
        try:
            status, reply = conn.recv()
        except EOFError:
            raise BenchError(f"client process {i} died (exit status {proc.exitcode}) during {what}") from None
        if status == "error":
            errors.append(f"client {i}: {reply}")
        replies.append(reply)
    return replies, errors


def spawn_workers(ctx, target, count: int, shared, name: str) -> tuple[list, list]:
    """``count`` processes running ``target(i, conn, shared)``: the processes, and this
    side's end of each one's pipe."""
    procs, conns = [], []
    for i in range(count):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(i, child, shared), name=f"{name}-{i}", daemon=True)
        proc.start()
        child.close()
        procs.append(proc)
        conns.append(parent)
    return procs, conns


def stop_workers(conns, procs) -> None:
    """Ask every live worker to exit, terminate those still there after 30 s, close the pipes."""
    for conn, proc in zip(conns, procs):
        if proc.is_alive():
            try:
                conn.send(("exit", None))
            except (OSError, BrokenPipeError):
                pass
    for proc in procs:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    for conn in conns:
        conn.close()


class WorkerPool:
    """``processes`` spawned client processes; ``levels`` are the concurrencies cases will use."""

    def __init__(self, processes: int, levels=(1,)) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.processes = processes
        self._barriers = {k: ctx.Barrier(k) for k in set(levels) if 1 < k <= processes}
        self._procs, self._conns = spawn_workers(ctx, _worker_main, processes, self._barriers, "bench-client")
        self.pids = self._collect(range(processes), "start")

    # -- plumbing --------------------------------------------------------
    def _collect(self, workers, what: str, timeout: float = 1800) -> list:
        replies, errors = collect_replies(self._conns, self._procs, workers, what, timeout)
        if errors:
            for barrier in self._barriers.values():
                barrier.reset()  # an aborted barrier must be usable again by the next case
            raise BenchError(f"{what} failed:\n" + "\n".join(errors))
        return replies

    def _all(self, command: str, args: list, workers=None) -> list:
        workers = list(range(self.processes) if workers is None else workers)
        for i, arg in zip(workers, args):
            self._conns[i].send((command, arg))
        return self._collect(workers, command)

    # -- commands ---------------------------------------------------------
    def open(self, spec: dict) -> list[str]:
        """Build the driver in every worker (a client of the system ``spec`` names)."""
        return self._all("open", [spec] * self.processes)

    def settings(self) -> list[dict]:
        """Every worker's driver settings (``Driver.settings``)."""
        return self._all("settings", [None] * self.processes)

    def prepare(self, block_size: int, batch: int, dst_blocks: list[int]) -> None:
        """Allocate (and register) each worker's buffers for ``block_size``; worker i's get
        destination holds ``dst_blocks[i]`` blocks."""
        self._all("prepare", [(block_size, batch, n) for n in dst_blocks])

    def run(self, case: Case) -> Result:
        if not 1 <= case.concurrency <= self.processes:
            raise BenchError(f"concurrency {case.concurrency} outside 1..{self.processes}")
        parts = self._all("run", [case] * case.concurrency, range(case.concurrency))
        started = min(p["t0"] for p in parts)
        finished = max(p["t1"] for p in parts)
        latencies = [s for p in parts for s in p["latencies"]]
        blocks = sum(p["blocks"] for p in parts)
        return Result(
            case.label, case.block_size, blocks, finished - started, latencies,
            system=case.system, op=case.op, concurrency=case.concurrency,
        )

    def clear(self) -> None:
        self._all("clear", [None], [0])

    def close_driver(self) -> None:
        self._all("close", [None] * self.processes)

    def shutdown(self) -> None:
        stop_workers(self._conns, self._procs)
        self._procs, self._conns = [], []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
