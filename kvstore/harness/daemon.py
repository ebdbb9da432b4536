"""``DaemonProcess``: one ``kvstore-server`` as a subprocess on a loopback port.

    proc = DaemonProcess(data_dir, "--memory", "64MiB").start()   # ready: gRPC health SERVING
    SyncClient(proc.address, ...)
    proc.kill9(); proc.start()        # the same port and data dir
    assert proc.terminate() == 0      # SIGTERM: drained, exit status 0

Port 0 means a free port chosen at the first start (and chosen again should
another program take it before the daemon binds it); every later start uses
the same one, so a restarted daemon is where its clients and peers expect it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kvstore.harness.health import grpc_serving
from kvstore.harness.ports import HOST, free_port
from kvstore.harness.process import TAIL_LINES, ServerProcess, StartError

# Starts on a port of our choosing, when another program takes it first.
PORT_ATTEMPTS = 3
# What the daemon's main says when it cannot bind its --listen address.
BIND_FAILED = "cannot bind"
START_LINE = "listening on"


class DaemonProcess(ServerProcess):
    """``python -m kvstore.server --listen HOST:PORT --data-dir DATA_DIR [--node-id ID] ARGS...``.

    ``args`` are further ``kvstore-server`` flags (``args`` may be changed
    between starts). ``env`` is added to this process's environment. For
    ``log_file``, ``detach``, ``die_with_parent`` and ``pid`` see ``ServerProcess``;
    a recorded pid is recognised by the data dir on its command line.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *args: str,
        port: int = 0,
        host: str = HOST,
        node_id: str | None = None,
        log_file: str | os.PathLike | None = None,
        env: dict | None = None,
        detach: bool = False,
        die_with_parent: bool = False,
        pid: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.host = host
        self.port = port
        self.node_id = node_id
        self.extra_env = dict(env or {})
        self._port_unproven = False  # chosen here and not served on yet: another may be chosen
        super().__init__(
            node_id or "kvstore-server",
            log_file=log_file,
            detach=detach,
            die_with_parent=die_with_parent,
            pid=pid,
            marker=str(self.data_dir),
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "kvstore.server", "--listen", self.address, "--data-dir", str(self.data_dir)]
        if self.node_id:
            cmd += ["--node-id", self.node_id]
        return cmd + self.args

    def ready(self) -> bool:
        return grpc_serving(self.address)

    def start(self, timeout: float = 30, *, wait: bool = True) -> "DaemonProcess":
        """Start the daemon and, with ``wait``, wait until it serves (StartError, and the
        process killed, if it exits or is not SERVING within ``timeout`` seconds)."""
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if not self.port:
                self.port = free_port(self.host)
                self._port_unproven = True
            super().start()
            if not wait:
                return self
            try:
                self.wait_ready(timeout)
            except StartError:
                self.kill9()  # a failed start leaves nothing running
                if self._port_unproven and attempt < PORT_ATTEMPTS and BIND_FAILED in self.log_tail(TAIL_LINES):
                    self.port = 0  # taken between choosing and binding: choose again
                    continue
                raise
            self._port_unproven = False
            # The start line follows SERVING by a moment: wait for it, so that the log read
            # right after start() holds it (a --log-level above INFO hides it: no error).
            self.wait_for_log(START_LINE, 2)
            return self
        raise AssertionError("unreachable")

    def to_dict(self) -> dict:
        """What a cluster's state file records of it (see ``LocalCluster``)."""
        return {
            "id": self.node_id,
            "port": self.port,
            "data_dir": str(self.data_dir),
            "log": str(self.log_file) if self.log_file else None,
            "pid": self.pid,
            "address": self.address,
        }

