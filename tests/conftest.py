"""Shared fixtures: real daemons, in-process on port 0 (integration) or as
subprocesses (fault tests), and a fresh namespace per test."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

# UCX's TCP transport would otherwise open connections on every interface of
# this host; the tests' daemons and clients talk over loopback only.
os.environ.setdefault("UCX_NET_DEVICES", "lo")

from kvstore.harness.ports import free_ports  # noqa: E402
from kvstore.server.config import ServerConfig  # noqa: E402
from kvstore.server.daemon import Daemon  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run the long soak/fault forms")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long soak or benchmark forms, run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long form: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class ThreadedDaemon:
    """A real daemon serving from its own event loop in a background thread,
    so sync clients, CLI calls and async tests can all use it."""

    def __init__(self, data_dir: Path, **settings) -> None:
        self.config = ServerConfig(listen="127.0.0.1:0", data_dir=str(data_dir), **settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-daemon", daemon=True)
        self.thread.start()
        self.daemon = self._call(Daemon(self.config).start())
        self.address = self.daemon.address

    def _call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def store(self):
        return self.daemon.store

    def stop(self) -> None:
        self._call(self.daemon.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    """One in-process daemon shared by the integration tests (namespaces keep them apart)."""
    d = ThreadedDaemon(tmp_path_factory.mktemp("daemon"), memory=256 << 20, max_value_size=96 << 20)
    yield d
    d.stop()


@pytest.fixture
def fresh_daemon(tmp_path):
    """A daemon of this test's own, for tests that look at daemon-wide state."""
    d = ThreadedDaemon(tmp_path / "data", memory=64 << 20)
    yield d
    d.stop()


@pytest.fixture
def tenant() -> str:
    """A tenant name no other test uses."""
    return "t-" + uuid.uuid4().hex[:12]


LISTENING = re.compile(r"listening on (\S+)")


class DaemonProcess:
    """``kvstore-server`` as a subprocess on a free port, for kill -9 and restart tests."""

    def __init__(self, data_dir: Path, *extra: str, port: int = 0) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.log: list[str] = []

    def start(self, timeout: float = 30) -> "DaemonProcess":
        cmd = [
            sys.executable, "-m", "kvstore.server",
            "--listen", f"127.0.0.1:{self.port}",
            "--data-dir", str(self.data_dir),
            *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            match = LISTENING.search(line)
            if match:
                self.address = match.group(1)
                self.port = int(self.address.rsplit(":", 1)[1])  # restarts reuse the port
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        raise RuntimeError("kvstore-server did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemon_process(tmp_path):
    """Factory of subprocess daemons, all killed at the end of the test."""
    started: list[DaemonProcess] = []

    def make(*extra: str, data_dir: Path | None = None) -> DaemonProcess:
        proc = DaemonProcess(data_dir or tmp_path / f"data{len(started)}", *extra)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


def kvstore_cli(*args: str, input: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the ``kvstore`` CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "kvstore.client.cli", *args],
        input=input,
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


async def wait_for(predicate, timeout: float = 10.0, what: str = "") -> float:
    """Poll ``predicate`` on the running loop until true; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what or predicate}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    return free_ports(1)[0]


class LocalCluster:
    """N subprocess daemons that know each other through --peers, on fixed ports
    so that a killed node restarts where its peers expect it."""

    def __init__(self, root: Path, nodes: int, *extra: str, etcd: str | None = None) -> None:
        self.root = root
        self.etcd = etcd  # membership through this etcd instead of --peers
        self.extra = ("--memory", "64MiB", *extra)
        self.ids = [f"node{i + 1}" for i in range(nodes)]
        self.ports = dict(zip(self.ids, free_ports(nodes)))  # bound together, so they differ
        self.procs = {node: self._process(node) for node in self.ids}

    def _process(self, node: str) -> DaemonProcess:
        if self.etcd:
            membership = ("--etcd", self.etcd, "--etcd-ttl", "3")
        else:
            membership = ("--peers", ",".join(f"{n}=127.0.0.1:{self.ports[n]}" for n in self.ids))
        return DaemonProcess(
            self.root / node, "--node-id", node, *membership, *self.extra, port=self.ports[node]
        )

    def add(self, node: str) -> DaemonProcess:
        """Start one more daemon (etcd membership: the others see it join)."""
        self.ports[node] = free_port()
        self.ids.append(node)
        self.procs[node] = self._process(node).start()
        return self.procs[node]

    def remove(self, node: str) -> None:
        """Stop one daemon for good (SIGTERM: under etcd it leaves the map at once)."""
        self.ids.remove(node)
        proc = self.procs.pop(node)
        proc.terminate()

    def start(self) -> "LocalCluster":
        for proc in self.procs.values():
            proc.start()
        return self

    def reconfigure(self, ids: list[str]) -> None:
        """Make ``ids`` the members: every daemon restarts in turn with the new
        peer list (SIGTERM, then start), new ones start, dropped ones stop."""
        for node in ids:
            self.ports.setdefault(node, free_port())
        gone = [n for n in self.ids if n not in ids]
        self.ids = list(ids)
        for node in ids:
            old = self.procs.get(node)
            if old is not None and old.proc is not None and old.proc.poll() is None:
                old.terminate()
            self.procs[node] = self._process(node).start()
        for node in gone:
            proc = self.procs.pop(node)
            if proc.proc is not None and proc.proc.poll() is None:
                proc.terminate()

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{self.ports[node]}" for node in self.ids]

    def __getitem__(self, node: str) -> DaemonProcess:
        return self.procs[node]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                try:
                    proc.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
            proc.stop()


@pytest.fixture
def local_cluster(tmp_path):
    """Factory of LocalClusters, all stopped at the end of the test."""
    made: list[LocalCluster] = []

    def make(nodes: int = 3, *extra: str, etcd: str | None = None) -> LocalCluster:
        cluster = LocalCluster(tmp_path / f"cluster{len(made)}", nodes, *extra, etcd=etcd)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.stop()
