"""Helpers of the native data-plane tests: completion recorders and peer processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from tests.native.peer import LOOPBACK, pattern

__all__ = ["LOOPBACK", "TRANSPORTS", "Completion", "Peer", "pattern"]

PEER_SCRIPT = Path(__file__).with_name("peer.py")

# "shm,tcp": CMA for the bytes, TCP for UCX's control messages and failure
# detection. "tcp": everything over TCP (RMA reads emulated by the peer).
TRANSPORTS = ["shm,tcp", "tcp"]


class Completion:
    """A completion callback that records its calls and can be waited on."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.threads: list[threading.Thread] = []
        self._done = threading.Event()

    def __call__(self, status: int, message: str) -> None:
        self.calls.append((status, message))
        self.threads.append(threading.current_thread())
        self._done.set()

    def wait(self, timeout: float = 10) -> tuple[int, str]:
        assert self._done.wait(timeout), "the completion callback was not called"
        return self.calls[0]


class Peer:
    """``peer.py`` in a subprocess: a worker with one registered buffer."""

    def __init__(self, tls: str, length: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER_SCRIPT), tls, str(length)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer.py exited with {self.proc.wait(10)}")
        info = json.loads(line)
        self.address = bytes.fromhex(info["address"])
        self.rkey = bytes.fromhex(info["rkey"])
        self.buffer = info["buffer"]
        self.length = info["length"]

    def pattern(self):
        return pattern(self.length)

    def command(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
