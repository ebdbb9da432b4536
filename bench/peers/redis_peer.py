"""Redis as a peer: a private ``redis-server`` on a free 127.0.0.1 port (or a
unix socket), driven by redis-py with the hiredis reply parser.

A batch is one pipeline (no MULTI) of SETs or GETs: one round trip per call,
as ``put_many``/``get_many`` are for kvstore. Persistence is off (no RDB, no
AOF), so a put is acknowledged from memory.

Copies: a put sends the caller's buffers as they are (redis-py's Python
command packer writes memoryviews to the socket without copying; its hiredis
packer would copy each value twice first). A get has one copy more than the
socket read: hiredis returns each value as ``bytes``, copied into the caller's
buffer inside the timed call.

    python -m bench.peers.redis_peer        # self-test: 64 KiB / 1 MiB / 16 MiB, both transports
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Sequence

from bench.peers import Peer, PeerError, selftest, which
from kvstore.harness.health import wait_for_port
from kvstore.harness.ports import free_port
from kvstore.harness.process import ServerProcess

INSTALL = "apt-get install redis-server; pip install 'redis[hiredis]'"


class RedisPeer(Peer):
    """``redis-server`` started and stopped by this object; ``transport`` is "tcp" or "unix"."""

    def __init__(
        self, *, transport: str = "tcp", packer: str = "python", server: str | None = None, attach: dict | None = None
    ) -> None:
        """``attach`` (from another RedisPeer's ``client_spec()``): connect to that peer's
        server instead of starting one (a client in another process)."""
        if transport not in ("tcp", "unix"):
            raise ValueError(f"transport must be 'tcp' or 'unix', not {transport!r}")
        if packer not in ("python", "hiredis"):
            raise ValueError(f"packer must be 'python' or 'hiredis', not {packer!r}")
        self.transport = transport
        self.packer = packer
        self.name = self.display_name(transport)
        self.server_binary = server or which("redis-server")
        self._dir: str | None = None
        self._server: ServerProcess | None = None
        self._client = None
        self.port: int | None = None
        self.socket_path: str | None = None
        self.server_version = "?"
        self._attach = attach
        if attach is not None:
            self.port = attach.get("port")
            self.socket_path = attach.get("socket_path")

    @staticmethod
    def display_name(transport: str) -> str:
        return "redis" if transport == "tcp" else "redis (unix)"

    @classmethod
    def unavailable(cls) -> str | None:
        missing = []
        if which("redis-server") is None:
            missing.append("redis-server not installed")
        try:
            import redis  # noqa: F401
            from redis.utils import HIREDIS_AVAILABLE
        except ImportError:
            missing.append("redis-py not installed")
        else:
            if not HIREDIS_AVAILABLE:
                missing.append("hiredis not installed")
        return f"{', '.join(missing)}: {INSTALL}" if missing else None

    # -- lifetime ----------------------------------------------------------
    def start(self) -> "RedisPeer":
        reason = self.unavailable()
        if reason:
            raise PeerError(reason)
        if self._attach is None:
            self._start_server()
        self._connect()
        return self

    def _start_server(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="kvstore-bench-redis-")
        argv = [
            self.server_binary,
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", self._dir,
            "--save", "",  # no RDB snapshots
            "--appendonly", "no",  # no AOF
            "--logfile", "",  # log to stdout, drained into the peer's log
            "--maxmemory", "0",
            # Replies of a big pipeline must never get the client disconnected.
            "--client-output-buffer-limit", "normal 0 0 0",
            "--client-query-buffer-limit", "2gb",
            "--proto-max-bulk-len", "1gb",  # values up to the bench's 256 MiB blocks and beyond
        ]
        for attempt in range(5):
            if self.transport == "tcp":
                self.port = free_port()
                address = ["--port", str(self.port)]
            else:
                self.socket_path = os.path.join(self._dir, "redis.sock")
                address = ["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
            self._server = ServerProcess("redis", [*argv, *address], cwd=self._dir, die_with_parent=True).start()
            if self._server.wait_for_log("eady to accept connections", timeout=20):
                break
            self._server.stop(5)
            if attempt == 4 or self.transport == "unix":
                raise PeerError(f"redis-server did not start:\n{self._server.log_tail()}")
        if self.transport == "tcp" and not wait_for_port("127.0.0.1", self.port, 10, self._server):
            raise PeerError(f"redis-server is not listening on 127.0.0.1:{self.port}:\n{self._server.log_tail()}")

    def _connect(self) -> None:
        import redis

        kwargs = dict(socket_timeout=300, socket_connect_timeout=10)
        if self.packer == "python":
            try:
                from redis._parsers.encoders import Encoder
                from redis.connection import PythonRespSerializer
            except ImportError:  # another redis-py layout: keep its default packer
                self.packer = "default"
            else:
                kwargs["command_packer"] = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
        # Connection options such as command_packer reach the connections through the pool.
        if self.transport == "tcp":
            pool = redis.ConnectionPool(host="127.0.0.1", port=self.port, **kwargs)
        else:
            pool = redis.ConnectionPool(
                connection_class=redis.UnixDomainSocketConnection, path=self.socket_path, **kwargs
            )
        self._client = redis.Redis(connection_pool=pool)
        self._client.ping()
        self.server_version = self._client.info("server").get("redis_version", "?")

    def client_spec(self) -> dict:
        return {
            "kind": "redis", "transport": self.transport, "packer": self.packer,
            "port": self.port, "socket_path": self.socket_path,
        }

    def stop(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
                self._client.connection_pool.disconnect()
            except Exception:
                pass
            self._client = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- data --------------------------------------------------------------
    def put_batch(self, keys: Sequence[bytes], values: Sequence[memoryview | bytes]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, value in zip(keys, values):
            pipe.set(key, value if isinstance(value, (bytes, memoryview)) else memoryview(value))
        try:
            replies = pipe.execute()
        except Exception as exc:
            raise PeerError(f"{self.name}: SET pipeline failed: {exc!r}\n{self.log_tail()}") from exc
        if len(replies) != len(keys) or not all(replies):
            raise PeerError(f"{self.name}: SET replies {replies!r}")

    def get_batch(self, keys: Sequence[bytes], out: Sequence[memoryview]) -> list[int]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        try:
            replies = pipe.execute()
        except Exception as exc:
            raise PeerError(f"{self.name}: GET pipeline failed: {exc!r}\n{self.log_tail()}") from exc
        sizes = []
        for value, dst in zip(replies, out):
            if value is None:
                sizes.append(-1)
                continue
            n = len(value)
            if n > len(dst):
                raise PeerError(f"{self.name}: a {n}-byte value does not fit a {len(dst)}-byte buffer")
            dst[:n] = value  # hiredis hands back bytes: one copy into the caller's buffer
            sizes.append(n)
        return sizes

    def clear(self) -> None:
        self._client.flushall(asynchronous=False)

    def describe(self) -> str:
        import hiredis
        import redis

        where = f"127.0.0.1:{self.port}" if self.transport == "tcp" else f"unix socket {self.socket_path}"
        return (
            f"{self.name}: redis-server {self.server_version} on {where}, no persistence (save '', appendonly no); "
            f"redis-py {redis.__version__} with hiredis {hiredis.__version__} reply parser, "
            f"{self.packer} command packer, one pipeline (no MULTI) of SET/GET per batch"
        )

    def log_tail(self, lines: int = 30) -> str:
        return self._server.log_tail(lines) if self._server is not None else ""


def main(argv: list[str] | None = None) -> int:
    reason = RedisPeer.unavailable()
    return selftest(
        [
            ("redis", lambda: RedisPeer(transport="tcp"), reason),
            ("redis (unix)", lambda: RedisPeer(transport="unix"), reason),
        ],
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
