"""Shared fixtures: real daemons, in-process on port 0 (integration) or as
subprocesses (fault tests: ``DaemonProcess`` and ``LocalCluster`` of
``kvstore.harness``), and a fresh namespace per test."""

from __future__ import annotations

import asyncio
import os
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

from kvstore.harness.cluster import LocalCluster  # noqa: E402
from kvstore.harness.daemon import DaemonProcess  # noqa: E402  (test modules import it from here)
from kvstore.harness.ports import free_port  # noqa: E402, F401  (test modules import it from here)
from kvstore.server.config import ServerConfig  # noqa: E402
from kvstore.server.daemon import Daemon  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run the long soak/fault forms")
    parser.addoption(
        "--no-engines", action="store_true", default=bool(os.environ.get("KVSTORE_NO_ENGINES")),
        help="skip the inference-engine tests (they need PyPI and venvs of their own; also KVSTORE_NO_ENGINES=1)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long soak or benchmark forms, run with --runslow")
    config.addinivalue_line("markers", "engines: tests against real inference engines (skip with --no-engines)")


def pytest_collection_modifyitems(config, items):
    no_engines = pytest.mark.skip(reason="engine tests: skipped by --no-engines / KVSTORE_NO_ENGINES")
    slow = pytest.mark.skip(reason="long form: run with --runslow")
    for item in items:
        if "engines" in item.keywords and config.getoption("--no-engines"):
            item.add_marker(no_engines)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(slow)


class ThreadedDaemon:
    """A real daemon serving from its own event loop in a background thread,
    so sync clients, CLI calls and async tests can all use it."""

    def __init__(self, data_dir: Path, **settings) -> None:
        self.config = ServerConfig(**{"listen": "127.0.0.1:0", **settings}, data_dir=str(data_dir))
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


@pytest.fixture
def daemon_process(tmp_path):
    """Factory of subprocess daemons (kvstore.harness), all killed at the end of the test."""
    started: list[DaemonProcess] = []

    def make(*extra: str, data_dir: Path | None = None) -> DaemonProcess:
        proc = DaemonProcess(data_dir or tmp_path / f"data{len(started)}", *extra)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.kill9()


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


@pytest.fixture
def local_cluster(tmp_path):
    """Factory of started LocalClusters (kvstore.harness) of subprocess daemons on fixed
    ports, so that a killed node restarts where its peers expect it; all killed at the
    end of the test. ``etcd``: membership through that etcd instead of --peers."""
    made: list[LocalCluster] = []

    def make(nodes: int = 3, *extra: str, etcd: str | None = None) -> LocalCluster:
        lease = ("--etcd-ttl", "3") if etcd else ()  # a killed member leaves the map within seconds
        cluster = LocalCluster.create(
            tmp_path / f"cluster{len(made)}", nodes, memory="64MiB", etcd_endpoints=etcd, server_args=(*lease, *extra)
        )
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.kill()
