"""A real, single-member etcd for tests (``kvstore.harness.etcd``): started on
free loopback ports with its data in the test's tmp_path, stopped (or
restarted on the same ports and data) by the test.

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
from pathlib import Path

import pytest

from kvstore.harness.etcd import EtcdProcess, find_etcd
from kvstore.harness.process import HarnessError


class EtcdServer(EtcdProcess):
    """One etcd process of a test, killed with it if the test process dies; ``endpoint``
    is the "127.0.0.1:PORT" clients dial."""

    def __init__(self, base_dir: Path, binary: str) -> None:
        base_dir = Path(base_dir)
        super().__init__(
            base_dir / "etcd-data", base_dir / "etcd.log", member="kvstore-test", binary=binary, die_with_parent=True
        )

    def start(self, timeout: float = 20, *, wait: bool = True) -> EtcdServer:
        if not self.running:
            super().start(timeout, wait=wait)
        return self

    def stop(self, timeout: float = 10, *, kill: bool = False) -> int | None:
        """Stop etcd (SIGTERM, or SIGKILL with ``kill``); the data dir stays."""
        return self.kill9() if kill else super().stop(timeout)

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): connections stay open and nothing answers."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def restart(self, *, kill: bool = False) -> EtcdServer:
        """Stop and start again on the same ports and data dir."""
        self.stop(kill=kill)
        return self.start()


def start_etcd(base_dir: Path) -> EtcdServer:
    """Start etcd under ``base_dir``, or skip the calling test when there is no binary."""
    binary = find_etcd(os.environ.get("KVSTORE_TEST_ETCD"))
    if binary is None:
        pytest.skip(
            "etcd binary not found ($KVSTORE_TEST_ETCD, PATH, /usr/bin/etcd): "
            "install it with `apt-get install etcd-server` to run the etcd tests"
        )
    for attempt in range(3):
        server = EtcdServer(base_dir, binary)
        try:
            return server.start()
        except HarnessError:
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
