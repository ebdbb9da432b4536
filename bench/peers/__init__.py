"""Peer systems measured next to kvstore in the same run: Redis, Mooncake Store and
LMCache's ``lm://`` server (from LMCache's own environment).

Each peer is a context manager that starts its own server processes on free
127.0.0.1 ports and stops them on exit, and moves batches of blocks with
blocking calls. The bench times those calls exactly as it times the kvstore
SDK's, with the same keys and the same key-prefixed values, and checks every
byte a get returns.

    from bench.peers import available_peers, run_peer

    for spec in available_peers():           # PeerSpec(name, factory, reason)
        if spec.reason:                       # not installed here: one line why
            print(f"{spec.name}: skipped ({spec.reason})")
            continue
        with spec.factory() as peer:
            results = run_peer(peer, block_size, blocks, batch=8)   # [put, get] Results

For client processes of their own (``python -m bench`` runs 1 and 4 at once),
a started peer hands out ``client_spec()``, a picklable description of its
servers, and ``attach(spec)`` builds, in another process, a client of those
servers that starts no server itself.

Peers are optional: their packages are an extra of the bench (see README.md
beside this file), and a peer whose software is missing reports why through
``unavailable()`` instead of failing the run.
"""

from __future__ import annotations

import abc
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from bench.measure import BenchError, Result
from bench.progress import Progress, quiet
from bench.workers import BlockValues  # one value layout: a key field, then a body


class PeerError(BenchError):
    """A peer failed to start or answered a call with an error."""


class Peer(abc.ABC):
    """A store to compare kvstore with. Subclasses set ``name`` and implement the calls.

    ``alloc`` hands out memory that the peer can move without an extra copy
    (registered with the transfer engine for Mooncake, plain memory for Redis).
    The bench fills put buffers and reads get buffers from it outside the timed
    calls; ``put_batch``/``get_batch`` also accept any other buffer, at the
    cost of a copy through a staging buffer inside the timed call.
    """

    name: str = "peer"
    # How many client processes may use one set of servers at once (None: any number).
    max_clients: int | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        """None when the peer can run here, else a one-line reason with the install command."""
        return None

    # -- lifetime --------------------------------------------------------
    def start(self) -> "Peer":
        return self

    def stop(self) -> None:
        pass

    def __enter__(self) -> "Peer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- data ------------------------------------------------------------
    def alloc(self, nbytes: int) -> memoryview:
        """A writable buffer of ``nbytes`` bytes, valid until ``stop``."""
        return memoryview(bytearray(nbytes))

    @abc.abstractmethod
    def put_batch(self, keys: Sequence[bytes], values: Sequence[memoryview | bytes]) -> None:
        """Store every value under its key; returns when all are stored, raises PeerError otherwise."""

    @abc.abstractmethod
    def get_batch(self, keys: Sequence[bytes], out: Sequence[memoryview]) -> list[int]:
        """Read each key's value into the caller's buffer; returns the sizes read (-1: missing)."""

    def free(self, view: memoryview) -> None:
        """Hand back a buffer from ``alloc`` (the peer may reuse it for a later ``alloc``)."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Remove every stored key (between block sizes, so each starts from an empty store)."""

    def describe(self) -> str:
        """One line for the report: version and the settings that shape the numbers."""
        return self.name

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the peer's server logs, for error messages."""
        return ""

    def client_spec(self) -> dict:
        """What ``attach`` needs to build a client of this peer's servers in another process."""
        raise NotImplementedError(f"{self.name} has no client for other processes")


def attach(spec: dict) -> Peer:
    """A client-only peer (not started yet) of the servers ``spec`` (a ``client_spec()``) describes."""
    kind = spec["kind"]
    if kind == "redis":
        from bench.peers.redis_peer import RedisPeer

        return RedisPeer(transport=spec["transport"], packer=spec["packer"], attach=spec)
    if kind == "mooncake":
        from bench.peers.mooncake_peer import MooncakePeer

        return MooncakePeer(
            mode=spec["mode"], segment_bytes=spec["segment_bytes"], local_buffer_bytes=spec["local_buffer_bytes"], attach=spec
        )
    if kind == "lmcache":
        from bench.peers.lmcache_peer import LMCachePeer

        return LMCachePeer(attach=spec)
    raise ValueError(f"unknown peer kind {kind!r}")


@dataclass(frozen=True)
class PeerSpec:
    """A peer the bench can run: ``factory()`` builds it; ``reason`` says why it cannot run here."""

    name: str
    factory: Callable[[], Peer]
    reason: str | None


def available_peers(
    names: Iterable[str] | None = None, *, segment_bytes: int | None = None
) -> list[PeerSpec]:
    """Every known peer (or those named: "redis", "redis-unix", "mooncake-tcp",
    "mooncake-shm", "mooncake-embedded", "lmcache"), each with the reason it cannot run
    here, if any. ``segment_bytes`` sizes Mooncake's memory pool (default 2 GiB)."""
    from bench.peers.lmcache_peer import LMCachePeer
    from bench.peers.mooncake_peer import MooncakePeer
    from bench.peers.redis_peer import RedisPeer

    mooncake_kw = {} if segment_bytes is None else {"segment_bytes": segment_bytes}
    known = {
        "redis": lambda: RedisPeer(transport="tcp"),
        "redis-unix": lambda: RedisPeer(transport="unix"),
        "mooncake-tcp": lambda: MooncakePeer(mode="tcp", **mooncake_kw),
        "mooncake-shm": lambda: MooncakePeer(mode="shm", **mooncake_kw),
        "mooncake-embedded": lambda: MooncakePeer(mode="embedded", **mooncake_kw),
        "lmcache": lambda: LMCachePeer(),
    }
    display = {
        "redis": RedisPeer.display_name("tcp"),
        "redis-unix": RedisPeer.display_name("unix"),
        "mooncake-tcp": MooncakePeer.display_name("tcp"),
        "mooncake-shm": MooncakePeer.display_name("shm"),
        "mooncake-embedded": MooncakePeer.display_name("embedded"),
        "lmcache": LMCachePeer.display_name(),
    }
    chosen = list(DEFAULT_PEERS if names is None else names)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(known)}")

    def owner(n: str):
        return RedisPeer if n.startswith("redis") else LMCachePeer if n == "lmcache" else MooncakePeer

    reasons = {cls: cls.unavailable() for cls in {owner(n) for n in chosen}}  # imports only what is asked for
    return [PeerSpec(display[n], known[n], reasons[owner(n)]) for n in chosen]


# The peers the bench runs by default: the same-host paths a KV-cache client would use.
DEFAULT_PEERS = ("redis", "mooncake-tcp", "mooncake-shm", "lmcache")
ALL_PEERS = ("redis", "redis-unix", "mooncake-tcp", "mooncake-shm", "mooncake-embedded", "lmcache")


# -- values and the timed cases ---------------------------------------------


def peer_key(peer: Peer, block_size: int, index: int | str) -> bytes:
    tag = "".join(c for c in peer.name if c.isalnum())
    suffix = f"{index:08d}" if isinstance(index, int) else index
    return f"b/{block_size}/{tag}/{suffix}".encode()


def _as_array(view: memoryview) -> np.ndarray:
    return np.frombuffer(view, dtype=np.uint8)


def run_peer(
    peer: Peer, block_size: int, blocks: int, *, batch: int, progress: Progress | None = None
) -> list[Result]:
    """Put ``blocks`` blocks in batches of ``batch``, then get them back; two Results,
    cases "<peer> put" and "<peer> get", one latency sample per call. Every
    returned byte is checked; the peer is cleared after."""
    progress = progress or quiet()
    values = BlockValues(block_size)
    keys = [peer_key(peer, block_size, i) for i in range(blocks)]
    width = min(batch, blocks)
    src_view = peer.alloc(width * block_size)
    dst_view = peer.alloc(width * block_size)
    src, dst = _as_array(src_view), _as_array(dst_view)
    values.fill(src, width)  # bodies once; each call stamps its keys
    src_blocks = [src_view[j * block_size : (j + 1) * block_size] for j in range(width)]
    dst_blocks = [dst_view[j * block_size : (j + 1) * block_size] for j in range(width)]

    # One unmeasured batch put and got back first: connection setup and first-call costs stay out,
    # and so does the first touch of the buffers (Mooncake's real client maps shared buffers lazily).
    warm = [peer_key(peer, block_size, f"warm{j}") for j in range(width)]
    values.stamp(src, warm)
    peer.put_batch(warm, src_blocks)
    peer.get_batch(warm, dst_blocks)

    put_latencies = []
    progress.stage(f"{_label(block_size)} {peer.name} put")
    for start in range(0, blocks, batch):
        chunk = keys[start : start + batch]
        values.stamp(src, chunk)  # outside the timed call
        began = time.perf_counter()
        peer.put_batch(chunk, src_blocks[: len(chunk)])
        put_latencies.append(time.perf_counter() - began)
        progress.advance(len(chunk) * block_size)

    get_latencies = []
    progress.stage(f"{_label(block_size)} {peer.name} get")
    for start in range(0, blocks, batch):
        chunk = keys[start : start + batch]
        dst[: len(chunk) * block_size] = 0  # a get that writes nothing cannot pass
        began = time.perf_counter()
        sizes = peer.get_batch(chunk, dst_blocks[: len(chunk)])
        get_latencies.append(time.perf_counter() - began)
        if len(sizes) != len(chunk):
            raise PeerError(f"{peer.name}: get_batch returned {len(sizes)} sizes for {len(chunk)} keys")
        for j, (key, size) in enumerate(zip(chunk, sizes)):
            if size < 0:
                raise PeerError(f"{peer.name}: get missed {key!r}, which was just put")
            if size != block_size:
                raise PeerError(f"{peer.name}: get returned {size} bytes for {key!r}; {block_size} were put")
            problem = values.check(values.block(dst, j), key, j)
            if problem:
                raise PeerError(f"{peer.name}: get returned different bytes for {key!r}: {problem}")
        progress.advance(len(chunk) * block_size)

    peer.clear()
    del src_blocks, dst_blocks, src, dst
    peer.free(src_view)
    peer.free(dst_view)
    return [
        Result(f"{peer.name} put", block_size, blocks, sum(put_latencies), put_latencies),
        Result(f"{peer.name} get", block_size, blocks, sum(get_latencies), get_latencies),
    ]


def _label(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


# -- server processes ----------------------------------------------------------
# A peer starts its servers as kvstore.harness ServerProcesses (output kept in memory,
# SIGTERMed by the kernel should the bench die first) on free ports from
# kvstore.harness.ports, and waits for them with kvstore.harness.health.wait_for_port.


def which(name: str, *extra_dirs: str) -> str | None:
    """``shutil.which``, also looking next to the running interpreter (a venv's bin/)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in (os.path.dirname(sys.executable), *extra_dirs):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# -- the self-test ---------------------------------------------------------------


def selftest(
    factories: list[tuple[str, Callable[[], Peer], str | None]],
    argv: list[str] | None = None,
) -> int:
    """``python -m bench.peers[.X]``: put/get a few block sizes through each peer and print GB/s."""
    import argparse

    from kvstore.units import parse_size

    p = argparse.ArgumentParser(description="Put and get through the peers, checking every byte.")
    p.add_argument("--sizes", default="64KiB,1MiB,16MiB", help="block sizes (default 64KiB,1MiB,16MiB)")
    p.add_argument("--batch", type=int, default=8, help="blocks per call (default 8)")
    p.add_argument("--volume", default="256MiB", help="bytes per case (default 256MiB)")
    p.add_argument("--min-calls", type=int, default=4, help="calls per case at least (default 4)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each size in a row (round 1 on a fresh server)")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    volume = parse_size(args.volume)
    failed = 0
    print(f"{'peer':<22} {'block':>8} {'blocks':>6} {'put GB/s':>9} {'get GB/s':>9} "
          f"{'put p50 ms':>10} {'put p99 ms':>10} {'get p50 ms':>10} {'get p99 ms':>10}")
    for name, factory, reason in factories:
        if reason:
            print(f"{name:<22} skipped: {reason}")
            continue
        try:
            with factory() as peer:
                print(f"# {peer.describe()}", flush=True)
                for size in sizes:
                    calls = max(args.min_calls, -(-volume // (size * args.batch)))
                    for round_ in range(args.rounds):
                        put, get = run_peer(peer, size, calls * args.batch, batch=args.batch)
                        tag = peer.name if args.rounds == 1 else f"{peer.name} #{round_ + 1}"
                        print(
                            f"{tag:<22} {_label(size):>8} {put.blocks:>6} {put.gbps:>9.3f} {get.gbps:>9.3f} "
                            f"{put.p50_ms:>10.3f} {put.p99_ms:>10.3f} {get.p50_ms:>10.3f} {get.p99_ms:>10.3f}",
                            flush=True,
                        )
        except BenchError as exc:
            failed += 1
            print(f"{name:<22} FAILED: {exc}", flush=True)
    print("byte-exact: every get compared with what was put" if not failed else f"{failed} peer(s) failed")
    return 1 if failed else 0
