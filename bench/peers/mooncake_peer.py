"""Mooncake Store as a peer, from the PyPI wheel ``mooncake-transfer-engine-non-cuda``.

The peer starts a private ``mooncake_master`` (object placement, leases) on
free 127.0.0.1 ports and, for the two client/server modes, a ``mooncake_client``
"real client": the process that owns the store's memory (its global segment),
as a storage node does in a Mooncake deployment. The bench process then talks
to it the two ways Mooncake offers on one host:

``tcp``  "mooncake (tcp)": a full store client (``setup()``, P2PHANDSHAKE
         metadata, protocol "tcp") that contributes no memory. Every byte of a
         put or get crosses the Transfer Engine's TCP transport between the
         bench process and the real client, from and into buffers registered
         with ``register_buffer`` (``batch_put_from`` / ``batch_get_into``).

``shm``  "mooncake (shm)": the co-located "dummy client" (``setup_dummy()``) of
         vLLM/SGLang deployments. Its buffers come from ``alloc_from_mem_pool``
         (memfd shared memory, passed to the real client over a unix socket and
         mapped there); a put or get is an RPC to the real client, which copies
         between that shared memory and its segment with memcpy.

``embedded``  "mooncake (embedded)": the bench process is itself the storage
         node (``setup()`` with a global segment, no real client); Mooncake's
         same-client path copies with memcpy (MC_STORE_MEMCPY, on by default
         with TCP). No server process is in the data path, so it is not a
         client/server number; it is not in the default set of peers.

Buffers from ``alloc()`` are registered once; ``put_batch``/``get_batch`` pass
their addresses straight to Mooncake (zero-copy). Other buffers go through a
registered staging buffer, with the copy inside the timed call.

    python -m bench.peers.mooncake_peer     # self-test: 64 KiB / 1 MiB / 16 MiB, every mode
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from typing import Sequence

import numpy as np

from bench.peers import Peer, PeerError, selftest
from kvstore.harness.health import wait_for_port
from kvstore.harness.ports import free_port
from kvstore.harness.process import ServerProcess

WHEEL = "mooncake-transfer-engine-non-cuda"
INSTALL = f"pip install {WHEEL}; apt-get install libibverbs1"
MODES = ("tcp", "shm", "embedded")
DEFAULT_SEGMENT_BYTES = 2 << 30
DEFAULT_LOCAL_BUFFER_BYTES = 64 << 20
HOST = "127.0.0.1"

ERRORS = {
    -1: "INTERNAL_ERROR", -10: "BUFFER_OVERFLOW", -101: "SEGMENT_NOT_FOUND", -103: "CLIENT_NOT_FOUND",
    -200: "NO_AVAILABLE_HANDLE (store full)", -400: "INVALID_KEY", -500: "WRITE_FAIL", -600: "INVALID_PARAMS",
    -700: "INVALID_WRITE", -701: "INVALID_READ", -703: "REPLICA_IS_NOT_READY", -704: "OBJECT_NOT_FOUND",
    -705: "OBJECT_ALREADY_EXISTS", -706: "OBJECT_HAS_LEASE", -707: "LEASE_EXPIRED", -800: "TRANSFER_FAIL",
    -900: "RPC_FAIL", -901: "RPC_TIMEOUT", -1012: "NOT_SUPPORTED",
}
OBJECT_NOT_FOUND = -704


def _error(code: int) -> str:
    return f"{code} {ERRORS.get(code, '')}".strip()


def _package_dir() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(directory, "mooncake_master")):
            return directory
    return None


def _binary(name: str) -> str | None:
    """The ELF binaries ship inside the package (the bin/ entries are Python wrappers that exec them)."""
    directory = _package_dir()
    if directory is None:
        return None
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    if not os.access(path, os.X_OK):
        os.chmod(path, os.stat(path).st_mode | 0o111)
    return path


def _quiet_glog() -> None:
    """glog in the store library logs every setup/close at INFO on stderr; keep ERROR and up
    unless the caller chose a level (glog reads GLOG_* once, when the library loads)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # the Transfer Engine resets glog's level from this


def _server_env() -> dict:
    """The servers log at INFO: their readiness lines are read from it."""
    return dict(os.environ, GLOG_minloglevel="0", MC_LOG_LEVEL="INFO")


def _address(view) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class MooncakePeer(Peer):
    def __init__(
        self,
        *,
        mode: str = "tcp",
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        local_buffer_bytes: int = DEFAULT_LOCAL_BUFFER_BYTES,
        client_threads: int = 2,
        prefault: bool = False,
        attach: dict | None = None,
    ) -> None:
        """``attach`` (from another MooncakePeer's ``client_spec()``): a store client of that
        peer's servers (master, real client) instead of starting its own (a client in another
        process; "tcp" and "shm" modes)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.name = self.display_name(mode)
        self.segment_bytes = segment_bytes
        self.local_buffer_bytes = local_buffer_bytes
        self.client_threads = client_threads
        self.prefault = prefault
        self.master: ServerProcess | None = None
        self.real_client: ServerProcess | None = None
        self.store = None
        self.master_port: int | None = None
        self.client_port: int | None = None
        self._regions: list[tuple[int, int]] = []  # registered (address, size)
        self._keep: list[object] = []  # the objects owning registered memory
        self._views: dict[int, memoryview] = {}  # address -> the whole registered buffer
        self._free: list[tuple[memoryview, int]] = []
        self._staging: memoryview | None = None
        self._attach = attach
        if attach is not None:
            if mode == "embedded":
                raise ValueError("an embedded store is its own storage node; it has no servers to attach to")
            self.master_port, self.client_port = attach["master_port"], attach["client_port"]
        # Several store clients may share one host: "tcp" ones each open their own Transfer
        # Engine, "shm" ones are dummy clients of the same real client (as vLLM TP ranks are).
        self.max_clients = 1 if mode == "embedded" else None

    @staticmethod
    def display_name(mode: str) -> str:
        return f"mooncake ({mode})"

    @classmethod
    def unavailable(cls) -> str | None:
        if _package_dir() is None:
            return f"{WHEEL} not installed: {INSTALL}"
        _quiet_glog()
        try:
            from mooncake.store import MooncakeDistributedStore  # noqa: F401
        except ImportError as exc:
            text = str(exc)
            if "libibverbs" in text:
                return f"mooncake.store needs libibverbs.so.1 even for TCP: apt-get install libibverbs1 ({text})"
            return f"mooncake.store does not import ({text}): {INSTALL}"
        for name in ("mooncake_master", "mooncake_client"):
            if _binary(name) is None:
                return f"{name} is missing from the {WHEEL} package: {INSTALL}"
        return None

    # -- lifetime ----------------------------------------------------------
    def start(self) -> "MooncakePeer":
        reason = self.unavailable()
        if reason:
            raise PeerError(reason)
        from mooncake.store import MooncakeDistributedStore

        if self._attach is None:
            self._start_master()
            if self.mode in ("tcp", "shm"):
                self._start_real_client()
        self.store = MooncakeDistributedStore()
        master = f"{HOST}:{self.master_port}"
        if self.mode == "tcp":
            # No global segment: this client only reads and writes the real client's memory.
            rc = self.store.setup(HOST, "P2PHANDSHAKE", 0, self.local_buffer_bytes, "tcp", "", master)
        elif self.mode == "shm":
            # mem_pool_size is unused by this version; each alloc_from_mem_pool is its own memfd.
            rc = self.store.setup_dummy(0, self.local_buffer_bytes, f"{HOST}:{self.client_port}")
        else:
            rc = self.store.setup(HOST, "P2PHANDSHAKE", self.segment_bytes, self.local_buffer_bytes, "tcp", "", master)
        if rc != 0:
            raise PeerError(f"{self.name}: store setup returned {rc}\n{self.log_tail()}")
        if self.mode != "shm" and self.store.health_check() != 0:  # a dummy client answers health_check non-zero
            raise PeerError(f"{self.name}: health_check failed after setup\n{self.log_tail()}")
        if self.prefault:
            self._prefault()
        return self

    def client_spec(self) -> dict:
        if self.mode == "embedded":
            raise NotImplementedError(
                f"{self.name}: the client is the storage node, so other processes cannot be its clients; "
                "measure it with python -m bench.peers.mooncake_peer"
            )
        return {
            "kind": "mooncake", "mode": self.mode, "master_port": self.master_port, "client_port": self.client_port,
            "segment_bytes": self.segment_bytes, "local_buffer_bytes": self.local_buffer_bytes,
        }

    def _prefault(self) -> None:
        """Write most of the segment once and remove it: the segment is plain aligned_alloc memory,
        so a fresh store pays a page fault per 4 KiB on first write; a long-running one does not."""
        block, batch = 16 << 20, 8
        buffer = self.alloc(block * batch)
        blocks = [buffer[i * block : (i + 1) * block] for i in range(batch)]
        target = int(self.segment_bytes * 0.85)  # under the master's 0.9 eviction watermark
        for start in range(0, target // block, batch):
            keys = [f"bench/prefault/{start + i:06d}".encode() for i in range(batch)]
            self.put_batch(keys, blocks)
        self.clear()
        del blocks
        self.free(buffer)

    def _start_master(self) -> None:
        for attempt in range(5):
            self.master_port, metrics_port = free_port(), free_port()
            argv = [
                _binary("mooncake_master"),
                f"--rpc_address={HOST}",
                f"--rpc_port={self.master_port}",
                f"--metrics_host={HOST}",
                f"--metrics_port={metrics_port}",
                "--enable_http_metadata_server=false",  # P2PHANDSHAKE: no metadata service
                "--logtostderr",
            ]
            self.master = ServerProcess("mooncake_master", argv, env=_server_env(), die_with_parent=True).start()
            if self.master.wait_for_log("Master service started", 30) and wait_for_port(
                HOST, self.master_port, 10, self.master
            ):
                return
            self.master.stop(5)
        raise PeerError(f"mooncake_master did not start:\n{self.master.log_tail()}")

    def _start_real_client(self) -> None:
        for attempt in range(5):
            self.client_port = free_port()
            argv = [
                _binary("mooncake_client"),
                f"--host={HOST}",
                f"--port={self.client_port}",
                f"--master_server_address={HOST}:{self.master_port}",
                "--metadata_server=P2PHANDSHAKE",
                "--protocol=tcp",
                f"--global_segment_size={self.segment_bytes}",
                "--local_buffer_size=0",
                f"--threads={self.client_threads}",
                "--logtostderr",
            ]
            self.real_client = ServerProcess("mooncake_client", argv, env=_server_env(), die_with_parent=True).start()
            if self.real_client.wait_for_log("Starting real client service", 60) and wait_for_port(
                HOST, self.client_port, 10, self.real_client
            ):
                return
            self.real_client.stop(5)
        raise PeerError(f"mooncake_client did not start:\n{self.real_client.log_tail()}")

    def stop(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            try:
                for address, _ in self._regions:
                    store.unregister_buffer(address)
                store.close()
            except Exception:
                pass
        self._regions.clear()
        self._views.clear()
        self._free.clear()
        self._staging = None
        for owner in self._keep:
            if isinstance(owner, mmap.mmap):
                try:
                    owner.close()
                except BufferError:  # a caller still holds a view; it is freed with the view
                    pass
        self._keep.clear()
        for attr in ("real_client", "master"):
            process = getattr(self, attr)
            if process is not None:
                process.stop()
                setattr(self, attr, None)

    # -- memory ------------------------------------------------------------
    def alloc(self, nbytes: int) -> memoryview:
        for i, (view, size) in enumerate(self._free):  # reuse a registered buffer that fits
            if size >= nbytes:
                del self._free[i]
                return view[:nbytes]
        if self.mode == "shm":
            address = self.store.alloc_from_mem_pool(nbytes)
            if not address:
                raise PeerError(f"{self.name}: alloc_from_mem_pool({nbytes}) failed")
            owner = (ctypes.c_uint8 * nbytes).from_address(address)
            view = memoryview(owner).cast("B")
        else:
            owner = mmap.mmap(-1, nbytes)  # page-aligned anonymous memory
            view = memoryview(owner)
            address = _address(view)
        rc = self.store.register_buffer(address, nbytes)
        if rc != 0:
            raise PeerError(f"{self.name}: register_buffer({nbytes} bytes) returned {_error(rc)}")
        self._regions.append((address, nbytes))
        self._keep.append(owner)
        self._views[address] = view
        return view

    def free(self, view: memoryview) -> None:
        """Hand a buffer from ``alloc`` back; it stays registered and a later ``alloc`` reuses it."""
        address = _address(view)
        whole = self._views.get(address)
        if whole is not None:
            self._free.append((whole, len(whole)))

    def _registered(self, address: int, size: int) -> bool:
        return any(base <= address and address + size <= base + n for base, n in self._regions)

    def _staging_for(self, total: int) -> memoryview:
        if self._staging is None or len(self._staging) < total:
            self._staging = self.alloc(max(total, 1 << 20))
        return self._staging

    # -- data --------------------------------------------------------------
    def put_batch(self, keys: Sequence[bytes], values: Sequence[memoryview | bytes]) -> None:
        sizes = [memoryview(v).nbytes for v in values]
        addresses = [_address(v) for v in values]
        if not all(self._registered(a, n) for a, n in zip(addresses, sizes)):
            staging = self._staging_for(sum(sizes))
            offset, addresses = 0, []
            for value, n in zip(values, sizes):
                staging[offset : offset + n] = value
                addresses.append(_address(staging[offset : offset + n]))
                offset += n
        codes = self.store.batch_put_from([k.decode() for k in keys], addresses, sizes)
        bad = [(k, c) for k, c in zip(keys, codes) if c != 0]
        if bad or len(codes) != len(keys):
            key, code = bad[0] if bad else (None, None)
            raise PeerError(
                f"{self.name}: batch_put_from failed for {len(bad)} of {len(keys)} keys "
                f"(first {key!r}: {_error(code) if code is not None else 'no result'})\n{self.log_tail()}"
            )

    def get_batch(self, keys: Sequence[bytes], out: Sequence[memoryview]) -> list[int]:
        sizes = [len(o) for o in out]
        addresses = [_address(o) for o in out]
        staged = not all(self._registered(a, n) for a, n in zip(addresses, sizes))
        if staged:
            staging = self._staging_for(sum(sizes))
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
            addresses = [_address(staging[o : o + n]) for o, n in zip(offsets, sizes)]
        got = self.store.batch_get_into([k.decode() for k in keys], addresses, sizes)
        result = []
        for i, (key, n) in enumerate(zip(keys, got)):
            if n == OBJECT_NOT_FOUND:
                result.append(-1)
            elif n < 0:
                raise PeerError(f"{self.name}: batch_get_into failed for {key!r}: {_error(n)}\n{self.log_tail()}")
            else:
                if staged:
                    out[i][:n] = staging[offsets[i] : offsets[i] + n]
                result.append(n)
        return result

    def clear(self) -> None:
        removed = self.store.remove_all(True)  # force: objects read in the last seconds still hold a lease
        if removed < 0:
            raise PeerError(f"{self.name}: remove_all returned {_error(removed)}")

    def describe(self) -> str:
        from importlib.metadata import version

        try:
            release = version(WHEEL)
        except Exception:
            release = "?"
        where = {
            "tcp": f"store client with no segment, Transfer Engine TCP to a mooncake_client holding a "
            f"{self.segment_bytes >> 20} MiB segment",
            "shm": f"dummy client, memfd shared memory + RPC to a mooncake_client holding a "
            f"{self.segment_bytes >> 20} MiB segment",
            "embedded": f"store client holding its own {self.segment_bytes >> 20} MiB segment (same-client memcpy)",
        }[self.mode]
        if self.prefault:
            where += " (segment prefaulted before the run)"
        return (
            f"{self.name}: {WHEEL} {release}; mooncake_master on {HOST}:{self.master_port} (P2PHANDSHAKE); "
            f"{where}; registered buffers, batch_put_from/batch_get_into per batch"
        )

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for process in (self.master, self.real_client):
            if process is not None:
                parts.append(f"--- {process.name} log ---\n{process.log_tail(lines)}")
        return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--prefault", action="store_true", help="write the segment once before measuring")
    p.add_argument("--segment", default="2GiB", help="the store's memory (default 2GiB)")
    ours, rest = p.parse_known_args(argv)
    from kvstore.units import parse_size

    segment = parse_size(ours.segment)
    reason = MooncakePeer.unavailable()
    factories = [
        (MooncakePeer.display_name(m), (lambda m=m: MooncakePeer(mode=m, prefault=ours.prefault, segment_bytes=segment)), reason)
        for m in ours.modes.split(",")
    ]
    return selftest(factories, rest)


if __name__ == "__main__":
    sys.exit(main())
