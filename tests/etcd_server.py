"""A real, single-member etcd for tests: started on free loopback ports with
its data in the test's tmp_path, stopped (or restarted on the same ports and
data) by the test.

    from tests.etcd_server import etcd_server  # noqa: F401  (the fixture)

    def test_x(etcd_server):
        EtcdMembership([etcd_server.endpoint], ...)

The binary is ``$KVSTORE_TEST_ETCD``, else ``etcd`` on PATH, else
``/usr/bin/etcd`` (Debian: ``apt-get install etcd-server``); without one the
test is skipped. A Debian-installed etcd service on 2379 is never used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT = 20.0


def find_etcd() -> str | None:
    candidates = [os.environ.get("KVSTORE_TEST_ETCD"), shutil.which("etcd"), "/usr/bin/etcd"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> list[str]:
    """A command prefix that kills etcd when the test process dies, where
    util-linux's setpriv is there (no preexec_fn: other threads may run)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class EtcdServer:
    """One etcd process; ``endpoint`` is the "127.0.0.1:PORT" clients dial."""

    def __init__(self, base_dir: Path, binary: str, name: str = "kvstore-test") -> None:
        self.binary = binary
        self.name = name
        self.data_dir = Path(base_dir) / "etcd-data"
        self.log_path = Path(base_dir) / "etcd.log"
        self.client_port = _free_port()
        self.peer_port = _free_port()
        while self.peer_port == self.client_port:
            self.peer_port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def start(self) -> EtcdServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        args = _die_with_parent() + [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self.name}={peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"kvstore-test-{self.client_port}",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        # etcd also reads ETCD_* variables; none of the caller's may leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with status {self.proc.returncode} while starting; last log lines:\n{self._tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as reply:
                    if b'"health":"true"' in reply.read().replace(b" ", b""):
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd on {self.endpoint} not healthy after {START_TIMEOUT:.0f}s:\n{self._tail()}")

    def _tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, *, kill: bool = False) -> None:
        """Stop etcd (SIGTERM, or SIGKILL with ``kill``); the data dir stays."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): connections stay open and nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, *, kill: bool = False) -> EtcdServer:
        """Stop and start again on the same ports and data dir."""
        self.stop(kill=kill)
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_etcd(base_dir: Path) -> EtcdServer:
    """Start etcd under ``base_dir``, or skip the calling test when there is no binary."""
    binary = find_etcd()
    if binary is None:
        pytest.skip(
            "etcd binary not found ($KVSTORE_TEST_ETCD, PATH, /usr/bin/etcd): "
            "install it with `apt-get install etcd-server` to run the etcd tests"
        )
    for attempt in range(3):
        server = EtcdServer(base_dir, binary)
        try:
            return server.start()
        except RuntimeError:
            # Most likely a free port was taken between probing and binding.
            server.stop(kill=True)
            shutil.rmtree(server.data_dir, ignore_errors=True)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def etcd_server(tmp_path):
    """A fresh single-member etcd of this test's own."""
    server = start_etcd(tmp_path)
    yield server
    server.stop(kill=True)
