"""LMCache's ``lm://`` server as a peer: ``python -m lmcache.v1.server 127.0.0.1 PORT cpu``.

The server is LMCache's reference remote backend: a thread per connection
reading a fixed-size ``ClientMetaMessage`` header (command, length, format,
dtype, shape, key) and then the value. A batch here is pipelined on one
connection: every PUT header and value, then one HEALTH round trip (the server
answers commands of a connection in order, so its reply means every PUT before
it was stored); every GET header, then each reply header and value read with
``recv_into`` straight into the caller's buffer.

LMCache is not in the bench's environment (see README.md beside this file): it
pulls torch and the CUDA Python stack even on a CPU-only host and pins numpy,
prometheus_client and setuptools below the bench's. So this peer is normally
reported as skipped; it was written against LMCache's v1 protocol
module and is untested here. It uses LMCache's own message classes, so their
layout follows the installed version.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import sys
from typing import Sequence

from bench.peers import Peer, PeerError
from kvstore.harness.health import wait_for_port
from kvstore.harness.ports import free_port
from kvstore.harness.process import ServerProcess

HOST = "127.0.0.1"
WHY_NOT_INSTALLED = (
    "lmcache is not in the bench's environment: lmcache 0.5.6 pins numpy<=2.2.6, prometheus_client<=0.24.1 "
    "and setuptools<81, and requires torch, cupy-cuda13x, cuda-python>=13 and more even on a CPU-only host"
)


class LMCachePeer(Peer):
    name = "lmcache (lm://)"

    def __init__(self, *, attach: dict | None = None) -> None:
        self.name = self.display_name()
        self._attach = attach
        self.port: int | None = attach["port"] if attach else None
        self._server: ServerProcess | None = None
        self._sock: socket.socket | None = None
        self.max_clients = None

    @staticmethod
    def display_name(mode: str = "") -> str:
        return "lmcache (lm://)"

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import lmcache  # noqa: F401
            from lmcache.v1.protocol import ClientMetaMessage, Constants, ServerMetaMessage  # noqa: F401
        except ImportError as exc:
            return f"lmcache is not installed ({exc}). {WHY_NOT_INSTALLED}"
        except Exception as exc:  # installed but broken (a torch or CUDA import failing)
            return f"lmcache does not import ({type(exc).__name__}: {exc})"
        return None

    # -- lifetime ----------------------------------------------------------
    def start(self) -> "LMCachePeer":
        reason = self.unavailable()
        if reason:
            raise PeerError(reason)
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.protocol import ClientMetaMessage, Constants, ServerMetaMessage
        import torch

        self._msg, self._const, self._reply = ClientMetaMessage, Constants, ServerMetaMessage
        self._fmt, self._torch = MemoryFormat(1), torch
        if self._attach is None:
            for _ in range(5):
                self.port = free_port()
                argv = [sys.executable, "-m", "lmcache.v1.server", HOST, str(self.port), "cpu"]
                self._server = ServerProcess("lmcache", argv, die_with_parent=True).start()
                if wait_for_port(HOST, self.port, 60, self._server):
                    break
                self._server.stop(5)
            else:
                raise PeerError(f"the lmcache server did not start:\n{self._server.log_tail()}")
        self._sock = socket.create_connection((HOST, self.port), timeout=300)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._health()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client_spec(self) -> dict:
        return {"kind": "lmcache", "port": self.port}

    # -- protocol ------------------------------------------------------------
    def _key(self, key: bytes):
        """A CacheEngineKey unique to ``key``; its fields differ between LMCache versions."""
        from lmcache.utils import CacheEngineKey

        digest = int.from_bytes(__import__("hashlib").blake2b(key, digest_size=8).digest(), "little")
        known = {
            "fmt": "vllm", "model_name": "kvstore-bench", "world_size": 1, "worker_id": 0,
            "chunk_hash": digest, "dtype": self._torch.uint8, "request_configs": None,
        }
        values = {}
        for f in dataclasses.fields(CacheEngineKey):
            if f.name in known:
                values[f.name] = known[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PeerError(f"{self.name}: unsupported lmcache version (CacheEngineKey field {f.name!r})")
        return CacheEngineKey(**values)

    def _header(self, command: int, key: bytes, length: int) -> bytes:
        shape = self._torch.Size([length, 0, 0, 0])
        return self._msg(command, self._key(key), length, self._fmt, self._torch.uint8, shape).serialize()

    def _recv_into(self, view: memoryview) -> None:
        filled = 0
        while filled < len(view):
            n = self._sock.recv_into(view[filled:])
            if n == 0:
                raise PeerError(f"{self.name}: the server closed the connection\n{self.log_tail()}")
            filled += n

    def _reply_code(self) -> tuple[int, int]:
        header = bytearray(self._reply.packlength())
        self._recv_into(memoryview(header))
        return struct.unpack_from("ii", header)  # code and length lead in every version

    def _health(self) -> None:
        self._sock.sendall(self._header(self._const.CLIENT_HEALTH, b"health", 0))
        code, _ = self._reply_code()
        if code != self._const.SERVER_SUCCESS:
            raise PeerError(f"{self.name}: health check answered {code}")

    # -- data --------------------------------------------------------------
    def put_batch(self, keys: Sequence[bytes], values: Sequence[memoryview | bytes]) -> None:
        for key, value in zip(keys, values):
            n = memoryview(value).nbytes
            self._sock.sendall(self._header(self._const.CLIENT_PUT, key, n))
            self._sock.sendall(value)
        self._health()  # answered after every PUT before it on this connection

    def get_batch(self, keys: Sequence[bytes], out: Sequence[memoryview]) -> list[int]:
        self._sock.sendall(b"".join(self._header(self._const.CLIENT_GET, key, 0) for key in keys))
        sizes = []
        for dst in out:
            code, n = self._reply_code()
            if code != self._const.SERVER_SUCCESS:
                sizes.append(-1)
                continue
            if n > len(dst):
                raise PeerError(f"{self.name}: a {n}-byte value does not fit a {len(dst)}-byte buffer")
            self._recv_into(memoryview(dst)[:n])
            sizes.append(n)
        return sizes

    def clear(self) -> None:
        """The protocol has no delete: keys are unique per case, so the store only grows."""

    def describe(self) -> str:
        from importlib.metadata import version

        return (
            f"{self.name}: lmcache {version('lmcache')} `python -m lmcache.v1.server` on {HOST}:{self.port} (cpu), "
            "one connection per client, pipelined PUT/GET headers per batch"
        )

    def log_tail(self, lines: int = 30) -> str:
        return self._server.log_tail(lines) if self._server is not None else ""
