"""LMCache's ``lm://`` server as a peer: ``python -m lmcache.v1.server 127.0.0.1 PORT cpu``.

The server is LMCache's reference remote backend: a thread per connection
reading a fixed-size request header and then the value. It runs from LMCache's
own environment (``$KVSTORE_LMCACHE_PYTHON``, else the one the engine tests
build under ``$KVSTORE_ENGINE_VENVS``/``~/.cache/kvstore/engines``): LMCache pins
numpy, prometheus_client and grpcio below the bench's and pulls torch, so it does
not go into the bench's environment. The bench's side speaks the wire layout of
LMCache 0.5.6's ``lmcache.v1.protocol`` itself (it needs nothing of LMCache):

- request (``ClientMetaMessage``): nine little-endian int32 (command, length,
  memory format, dtype, location, shape[4]) and the key string padded to 150
  bytes with spaces; a PUT is followed by ``length`` value bytes.
- reply (``ServerMetaMessage``): nine int32 (code 200/400, length, format, dtype,
  location, shape[4]); a successful GET is followed by ``length`` bytes.

A batch is pipelined on one connection: every PUT header and value, then one
HEALTH round trip (the server answers a connection's commands in order, so its
reply means every PUT before it was stored); every GET header, then each reply
header and value read with ``recv_into`` straight into the caller's buffer.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
from pathlib import Path
from typing import Sequence

from bench.peers import Peer, PeerError
from kvstore.harness.health import wait_for_port
from kvstore.harness.ports import free_port
from kvstore.harness.process import ServerProcess

HOST = "127.0.0.1"
REQUEST = struct.Struct("<9i150s")
REPLY = struct.Struct("<9i")
PUT, GET, EXIST, LIST, HEALTH = 1, 2, 3, 4, 5
SUCCESS = 200
BINARY, UINT8 = 4, 6  # MemoryFormat.BINARY, the dtype code of torch.uint8
ENGINE_VENVS = Path(os.environ.get("KVSTORE_ENGINE_VENVS") or Path.home() / ".cache" / "kvstore" / "engines")
HOW_TO_GET_ONE = (
    "set KVSTORE_LMCACHE_PYTHON to the python of an environment with lmcache 0.5.6 "
    "(python -m venv /opt/lmcache && /opt/lmcache/bin/pip install lmcache==0.5.6), "
    "or run the engine tests once (make test), which build one"
)


def lmcache_python() -> Path | None:
    """The python of an environment where LMCache is installed, if there is one."""
    configured = os.environ.get("KVSTORE_LMCACHE_PYTHON")
    if configured:
        return Path(configured)
    for name in ("lmcache-lmcache-first", "lmcache-kvstore-first"):
        candidate = ENGINE_VENVS / name / "bin" / "python"
        if candidate.exists():
            return candidate
    return None


def request(command: int, key: bytes, length: int) -> bytes:
    """A request header; the key is an LMCache chunk key (model@world@worker@hash@dtype)."""
    digest = hashlib.blake2b(key, digest_size=8).hexdigest()
    name = f"kvstore-bench@1@0@{digest}@uint8".encode().ljust(150)  # space-padded, as LMCache pads it
    return REQUEST.pack(command, length, BINARY, UINT8, 0, length, 0, 0, 0, name)


class LMCachePeer(Peer):
    name = "lmcache (lm://)"

    def __init__(self, *, attach: dict | None = None) -> None:
        self.name = self.display_name()
        self._attach = attach
        self.port: int | None = attach["port"] if attach else None
        self._server: ServerProcess | None = None
        self._sock: socket.socket | None = None
        self.max_clients = None

    version = "?"

    @staticmethod
    def display_name(mode: str = "") -> str:
        return "lmcache (lm://)"

    @classmethod
    def unavailable(cls) -> str | None:
        python = lmcache_python()
        if python is None:
            return f"no environment with lmcache found: {HOW_TO_GET_ONE}"
        found = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m, lmcache.v1.server; print(m.version('lmcache'))"],
            capture_output=True, text=True, timeout=120, cwd=python.parent,
        )
        if found.returncode != 0:
            return f"lmcache does not import in {python}: {found.stderr.strip()[-300:]}"
        cls.version = found.stdout.strip().splitlines()[-1]
        return None

    # -- lifetime ----------------------------------------------------------
    def start(self) -> "LMCachePeer":
        if self._attach is None:
            reason = self.unavailable()
            if reason:
                raise PeerError(reason)
            python = lmcache_python()
            for _ in range(5):
                self.port = free_port()
                argv = [str(python), "-m", "lmcache.v1.server", HOST, str(self.port), "cpu"]
                env = {**os.environ, "PYTHONPATH": ""}  # LMCache's packages only, not the bench's tree
                self._server = ServerProcess("lmcache", argv, die_with_parent=True, env=env, cwd=str(python.parent)).start()
                if wait_for_port(HOST, self.port, 120, self._server):
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
    def _recv_into(self, view: memoryview) -> None:
        filled = 0
        while filled < len(view):
            n = self._sock.recv_into(view[filled:])
            if n == 0:
                raise PeerError(f"{self.name}: the server closed the connection\n{self.log_tail()}")
            filled += n

    def _reply_code(self) -> tuple[int, int]:
        header = bytearray(REPLY.size)
        self._recv_into(memoryview(header))
        return REPLY.unpack(header)[:2]

    def _health(self) -> None:
        self._sock.sendall(request(HEALTH, b"health", 0))
        code, _ = self._reply_code()
        if code != SUCCESS:
            raise PeerError(f"{self.name}: health check answered {code}")

    # -- data --------------------------------------------------------------
    def put_batch(self, keys: Sequence[bytes], values: Sequence[memoryview | bytes]) -> None:
        for key, value in zip(keys, values):
            n = memoryview(value).nbytes
            self._sock.sendall(request(PUT, key, n))
            self._sock.sendall(value)
        self._health()  # answered after every PUT before it on this connection

    def get_batch(self, keys: Sequence[bytes], out: Sequence[memoryview]) -> list[int]:
        self._sock.sendall(b"".join(request(GET, key, 0) for key in keys))
        sizes = []
        for dst in out:
            code, n = self._reply_code()
            if code != SUCCESS:
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
        return (
            f"{self.name}: lmcache {self.version} `python -m lmcache.v1.server` on {HOST}:{self.port} (cpu), "
            "one connection per client, pipelined PUT/GET headers per batch"
        )

    def log_tail(self, lines: int = 30) -> str:
        return self._server.log_tail(lines) if self._server is not None else ""
