"""Daemons for the fuzz tests.

``rpc_daemon``: in-process (``ThreadedDaemon``, port 0), data plane off, in a
static cluster of two whose second member never answers, so that the
routing check (``kvstore-epoch`` metadata, WRONG_NODE) is fuzzed too.

``proc_daemon``: a ``kvstore-server`` subprocess with its data plane and
local channel, for what could take a process down (UCX parsing worker
addresses and rkeys, shared-memory descriptors, raw sockets): a crash shows
as an exit status there, its RSS and open fds can be read from /proc, and
``revive()`` restarts it so that hypothesis can go on shrinking the case
that killed it.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import grpc
import pytest

from kvstore._proto.v1 import admin_pb2
from kvstore.harness.daemon import DaemonProcess
from kvstore.harness.ports import free_port
from kvstore.protocol.metadata import channel_options
from tests.conftest import ThreadedDaemon
from tests.fuzz.strategies import path
from tests.fuzz.support import (
    MAX_FD_GROWTH,
    MAX_RSS_GROWTH,
    assert_serving,
    open_fds,
    rss_bytes,
)

try:
    from kvstore import _native

    NATIVE = _native.available()
except ImportError:  # pragma: no cover - the package always imports
    NATIVE = False

RPC_MAX_VALUE = 1 << 20  # small, so that values at and past the limit are cheap to send
PROC_MEMORY = 64 << 20


@pytest.fixture(scope="module")
def rpc_daemon(tmp_path_factory):
    d = ThreadedDaemon(
        tmp_path_factory.mktemp("fuzz-rpc"),
        memory=32 << 20,
        max_value_size=RPC_MAX_VALUE,
        data_plane=False,
        node_id="fuzz-a",
        peers=f"fuzz-b=127.0.0.1:{free_port()}",  # nobody listens there
        rebalance_interval=3600.0,
    )
    yield d
    d.stop()


class FuzzedProcess:
    """A daemon subprocess the fuzz may kill: restarted on demand, counted; its
    Prometheus metrics and its log file are read to find what no reply shows."""

    def __init__(self, data_dir) -> None:
        self.metrics_port = free_port()
        self.log_file = data_dir.parent / "daemon.log"
        self.proc = DaemonProcess(
            data_dir, "--memory", f"{PROC_MEMORY >> 20}MiB", "--metrics-port", str(self.metrics_port),
            log_file=self.log_file,
        )
        self.channel: grpc.Channel | None = None
        self.deaths: list[str] = []  # what each crash left in the log
        self.restarts = 0
        self.excused: list[tuple[int, int]] = []  # log byte ranges of a known finding (not alarms again)

    @property
    def address(self) -> str:
        return self.proc.address

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "FuzzedProcess":
        self.proc.start()
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.address, options=channel_options())
        self._wait_prefaulted()
        return self

    def _wait_prefaulted(self, timeout: float = 60) -> None:
        """The arena is faulted in after start: RSS is a baseline only once it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self.channel.unary_unary(path("Admin", "ServerStats"))(b"", timeout=10)
            stats = admin_pb2.ServerStatsResponse.FromString(raw)
            memory = [t for t in stats.tiers if t.name == "memory"]
            if not memory or memory[0].resident_bytes >= memory[0].capacity_bytes:
                return
            time.sleep(0.05)

    def dead(self, wait: float = 0.0) -> bool:
        """Whether it exited (waiting up to ``wait`` s: a crash takes a moment to be reaped)."""
        deadline = time.monotonic() + wait
        while True:
            if not self.proc.running:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def revive(self) -> bool:
        """Restart it if it died; True when it had to."""
        if not self.dead():
            return False
        self.deaths.append(f"exit status {self.proc.returncode}:\n{self.proc.log_tail(25)}")
        self.restart()
        return True

    def restart(self, excuse_log_from: int | None = None) -> None:
        """Kill and start it again (same port and data); with ``excuse_log_from``, what it
        logged since that offset was a known finding, reported where it was found."""
        self.proc.kill9()
        if excuse_log_from is not None:
            self.excused.append((excuse_log_from, self.log_size()))  # all of it: the process is gone
        self.proc.start()
        self.restarts += 1

    def accepts(self) -> bool:
        """Whether its gRPC port still accepts connections."""
        host, port = self.address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            return True
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        """The daemon's /metrics samples, by line prefix ``name{labels}``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def log_size(self) -> int:
        return self.log_file.stat().st_size if self.log_file.exists() else 0

    def log_since(self, offset: int) -> str:
        """The log from ``offset`` on, less the ranges of known findings."""
        with open(self.log_file, "rb") as log:
            log.seek(offset)
            data = log.read()
        kept, position = [], 0
        for start, end in sorted(self.excused):
            start, end = start - offset, end - offset
            if end > position:
                kept.append(data[position : max(position, start)])
                position = max(position, end)
        kept.append(data[position:])
        return b"".join(kept).decode(errors="replace")

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.proc.kill9()


# What the daemon's log shows of an exception no reply carried.
LOG_ALARMS = ("Traceback", "unexpected failure", "never retrieved", "Exception in callback", "Fatal Python error")


def bad_statuses(samples: dict[str, float]) -> dict[str, float]:
    """kvstore_requests_total samples with an INTERNAL or UNKNOWN code."""
    return {
        k: v for k, v in samples.items()
        if k.startswith("kvstore_requests_total") and ('code="INTERNAL"' in k or 'code="UNKNOWN"' in k)
    }


def data_plane_clients(d: FuzzedProcess) -> int:
    raw = d.channel.unary_unary(path("Admin", "ServerStats"))(b"", timeout=10)
    return admin_pb2.ServerStatsResponse.FromString(raw).data_plane_clients


@pytest.fixture
def watched(proc_daemon):
    """``proc_daemon``, checked over the whole test: no crash, SERVING and a round trip
    after it, no INTERNAL/UNKNOWN counted in its metrics, no exception in its log, no
    more local-channel connections than before, RSS and open fds bounded (fds: beyond
    what the sessions opened meanwhile hold, each a UCX endpoint, a pidfd and its
    shared-memory mappings)."""
    d = proc_daemon
    rss, fds, clients = rss_bytes(d.pid), open_fds(d.pid), data_plane_clients(d)
    bad, log_start, restarts = bad_statuses(d.metrics()), d.log_size(), d.restarts
    connections = d.metrics().get("kvstore_local_channel_connections", 0.0)
    yield d
    assert not d.deaths, "FINDING: the daemon died during the test:\n" + "\n".join(d.deaths)
    assert_serving(d.address)
    samples = d.metrics()
    if d.restarts != restarts:  # (a known finding restarted it: its counters, RSS and fds start again)
        bad, connections = {}, 0.0
        rss, fds, clients = rss_bytes(d.pid), open_fds(d.pid), 0
    assert bad_statuses(samples) == bad, f"FINDING: the daemon counted {bad_statuses(samples)} (before: {bad})"
    log = d.log_since(log_start)
    alarms = [line for line in log.splitlines() if any(a in line for a in LOG_ALARMS)]
    assert not alarms, "FINDING: the daemon logged an exception:\n" + log[log.find(alarms[0]) - 2000 :][:6000]
    deadline = time.monotonic() + 5  # the daemon notices closed sockets on its next loop turn
    while d.metrics().get("kvstore_local_channel_connections", 0.0) > connections and time.monotonic() < deadline:
        time.sleep(0.05)
    held = d.metrics().get("kvstore_local_channel_connections", 0.0)
    assert held <= connections + 2, f"FINDING: {held} local-channel connections held (before: {connections})"
    grown, more_fds = rss_bytes(d.pid) - rss, open_fds(d.pid) - fds
    more_clients = max(0, data_plane_clients(d) - clients)
    print(f"daemon RSS {rss >> 20} -> {(rss + grown) >> 20} MiB, fds {fds} -> {fds + more_fds}, sessions +{more_clients}")
    assert grown < MAX_RSS_GROWTH, f"FINDING: daemon RSS grew by {grown >> 20} MiB"
    allowed = MAX_FD_GROWTH + FDS_PER_SESSION * more_clients
    assert more_fds < allowed, f"FINDING: the daemon holds {more_fds} more fds (allowed {allowed}) than before the test"


# A session's fds in the fuzz: its UCX endpoint's socket, the pidfd watching the
# client, and the dup'ed memfd fd of each shared-memory mapping (the fuzz names
# at most 8 region ids with a mappable descriptor).
FDS_PER_SESSION = 2 + 8


@pytest.fixture(scope="module")
def proc_daemon(tmp_path_factory):
    if not NATIVE:
        pytest.skip("no native data plane: the subprocess daemon would serve no local channel")
    d = FuzzedProcess(tmp_path_factory.mktemp("fuzz-proc") / "data").start()
    yield d
    d.stop()
