"""``EtcdProcess``: a single-member etcd on loopback, for etcd membership.

The binary is the first executable of the candidates given, ``etcd`` on PATH
and ``/usr/bin/etcd`` (Debian: ``apt-get install etcd-server``). Ports 0 mean
free ports chosen at the first start; later starts keep them and the data dir,
so a restarted etcd is the same member with the same keys.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kvstore.harness.health import etcd_healthy
from kvstore.harness.ports import HOST, free_ports
from kvstore.harness.process import HarnessError, ServerProcess

ETCD_BINARY = "/usr/bin/etcd"  # Debian's etcd-server package
MEMBER = "kvstore-local"


def find_etcd(*candidates: str | None) -> str | None:
    """The first executable of ``candidates``, ``etcd`` on PATH and ``ETCD_BINARY``; None if none is."""
    for path in (*candidates, shutil.which("etcd"), ETCD_BINARY):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class EtcdProcess(ServerProcess):
    """``etcd`` with its data in ``data_dir``, ready once /health says so. For
    ``log_file``, ``detach``, ``die_with_parent`` and ``pid`` see ``ServerProcess``;
    a recorded pid is recognised by the data dir on its command line."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        log_file: str | os.PathLike | None = None,
        *,
        client_port: int = 0,
        peer_port: int = 0,
        member: str = MEMBER,
        binary: str | None = None,
        detach: bool = False,
        die_with_parent: bool = False,
        pid: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.client_port = client_port
        self.peer_port = peer_port
        self.member = member
        self.binary = binary
        super().__init__(
            "etcd", log_file=log_file, detach=detach, die_with_parent=die_with_parent, pid=pid, marker=str(self.data_dir)
        )

    @property
    def endpoint(self) -> str:
        """HOST:PORT, what ``kvstore-server --etcd`` takes."""
        return f"{HOST}:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def command(self) -> list[str]:
        binary = self.binary or find_etcd()
        if binary is None:
            raise HarnessError(f"etcd membership needs the etcd server ({ETCD_BINARY}): apt-get install etcd-server")
        peer_url = f"http://{HOST}:{self.peer_port}"
        return [
            binary,
            "--name", self.member,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self.member}={peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"{self.member}-{self.client_port}",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip

    def ready(self) -> bool:
        return etcd_healthy(self.endpoint)

    def start(self, timeout: float = 20, *, wait: bool = True) -> "EtcdProcess":
        """Start etcd and, with ``wait``, wait until it is healthy (StartError otherwise)."""
        if not self.client_port or not self.peer_port:
            self.client_port, self.peer_port = free_ports(2)
        # etcd also reads ETCD_* variables; none of this process's may leak in.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.cwd = self.data_dir.parent
        super().start()
        if wait:
            self.wait_ready(timeout)
        return self

    def to_dict(self) -> dict:
        """What a cluster's state file records of it (see ``LocalCluster``)."""
        return {
            "client_port": self.client_port,
            "peer_port": self.peer_port,
            "data_dir": str(self.data_dir),
            "log": str(self.log_file) if self.log_file else None,
            "pid": self.pid,
            "endpoint": self.endpoint,
        }
