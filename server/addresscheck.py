"""Client worker addresses are tried in a sacrificial process before the
daemon's own UCX sees them.

A packed UCX worker address carries no length, and UCX unpacks it trusting
what it finds: a Hello whose ``worker_address`` was two arbitrary bytes made
UCX assert (``address.c: *addr_version == UCP_OBJECT_VERSION_V2``) and took the
daemon down. UCX's format has no stable public description to check against,
so the daemon does not guess at it: a child process with the same UCX
configuration (``python -m kvstore.server.addresscheck TLS``) creates and
closes an endpoint to each address first, and only an address the child
survived reaches the daemon's worker (UCX parses it the same way in both).
A child that dies or stays silent past ``TIMEOUT`` is replaced, and the Hello
is refused with INVALID_ARGUMENT (INVALID_WORKER_ADDRESS).

Child protocol, over its stdin and stdout: it writes ``READY`` once its worker
is up; then for each request ``u32 length | address`` it answers
``u8 status (0: an endpoint was made) | u16 n | message (n bytes)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import struct
import subprocess
import sys
import threading
import time

from kvstore import errors
from kvstore.protocol.codes import ErrorCode

log = logging.getLogger("kvstore.server.dataplane")

READY = b"READY\n"
REQUEST = struct.Struct("!I")
REPLY = struct.Struct("!BH")
TIMEOUT = 5.0  # seconds an address may take the child; a hang counts as a crash
START_TIMEOUT = 30.0
MAX_ADDRESS_BYTES = 64 << 10  # real ones are hundreds of bytes


class AddressCheck:
    """The parent side: one child at a time, started ahead of the first Hello.

    The child is started with ``subprocess`` (vfork and exec) and spoken to with
    blocking reads on a thread: uvloop's own subprocesses fork, and a fork of a
    process serving gRPC may run gRPC's fork handlers in the child."""

    def __init__(self, tls: str | None) -> None:
        self.tls = tls or ""
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.replaced = 0  # children lost to an address (crashed or hung)
        self._starting: asyncio.Future | None = None

    def start(self) -> None:
        """Start the child in the background: the first Hello waits for it, the daemon's start does not."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(asyncio.to_thread(self._start_quietly))

    def _start_quietly(self) -> None:
        try:
            with self._lock:
                self._ensure_child()
        except errors.KVStoreError as exc:  # the first Hello tries again, and says why
            log.warning("%s", exc.message)

    async def check(self, address: bytes) -> None:
        """Return if a UCX endpoint can be made to ``address``; else InvalidArgumentError."""
        if not 0 < len(address) <= MAX_ADDRESS_BYTES:
            raise self._refused(f"{len(address)} bytes is not the size of a worker address")
        outcome = await asyncio.to_thread(self._try, address)
        if outcome is None:
            log.warning("a Hello's worker address crashed the address check (%d bytes); refused", len(address))
            raise self._refused("UCX cannot parse it")
        status, message = outcome
        if status != 0:
            raise self._refused(message)

    def _try(self, address: bytes) -> tuple[int, str] | None:
        """(status, message) from the child; None when it died or hung on ``address``."""
        with self._lock:
            child = self._ensure_child()
            deadline = time.monotonic() + TIMEOUT
            try:
                os.write(child.stdin.fileno(), REQUEST.pack(len(address)) + address)
                status, length = REPLY.unpack(_read(child.stdout.fileno(), REPLY.size, deadline))
                message = _read(child.stdout.fileno(), length, deadline).decode(errors="replace")
            except (OSError, EOFError, TimeoutError):
                self._discard()
                self.replaced += 1
                return None
            return status, message

    def _ensure_child(self) -> subprocess.Popen:
        if self._child is not None and self._child.poll() is None:
            return self._child
        self._discard()
        child = subprocess.Popen(
            [sys.executable, "-m", "kvstore.server.addresscheck", self.tls],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
        )
        try:
            ready = _read(child.stdout.fileno(), len(READY), time.monotonic() + START_TIMEOUT)
        except (OSError, EOFError, TimeoutError):
            ready = b""
        if ready != READY:
            _stop(child)
            raise errors.InternalError("the worker-address check process did not start")
        self._child = child
        return child

    def _discard(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            _stop(child)

    @staticmethod
    def _refused(why: str) -> errors.InvalidArgumentError:
        return errors.InvalidArgumentError(f"invalid worker address: {why}", code=ErrorCode.INVALID_WORKER_ADDRESS)

    async def close(self) -> None:
        if self._starting is not None:
            await self._starting
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child.stdin.close()  # the child exits at EOF
            try:
                child.wait(2.0)
            except subprocess.TimeoutExpired:
                _stop(child)
            child.stdout.close()


def _read(fd: int, n: int, deadline: float) -> bytes:
    """Exactly ``n`` bytes from ``fd`` by ``deadline``; EOFError if it closes first."""
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            stream.close()


def main() -> int:
    """The child: try each address on a worker configured as the daemon's."""
    # UCX logs to standard output: the replies get a descriptor of their own.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    from kvstore import _native

    worker = _native.Worker(_native.Context(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None))
    stdin, stdout = sys.stdin.buffer, replies
    stdout.write(READY)
    stdout.flush()
    while True:
        head = stdin.read(REQUEST.size)
        if len(head) < REQUEST.size:
            return 0  # the daemon closed us
        (length,) = REQUEST.unpack(head)
        address = stdin.read(length)
        try:
            worker.connect(address).close()
            status, message = 0, b""
        except errors.KVStoreError as exc:
            status, message = 1, exc.message.encode()[:1000]
        stdout.write(REPLY.pack(status, len(message)) + message)
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
