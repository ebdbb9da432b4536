"""What the machine itself can do for one block size: memcpy and loopback TCP.

These are the ceilings the kvstore numbers are read against: a get through the
SDK can at best move bytes as fast as one TCP connection on 127.0.0.1 (for
the TCP-only path) or a memcpy (for the co-located, shared-memory path). Both
run in the bench's client processes (bench.workers) like every other case: a
batch of blocks per call, 1 or N processes at once.

memcpy   each call copies the batch block by block (``np.copyto``) from one
         prefaulted buffer into another (both batch-sized, reused every call).
TCP      one 127.0.0.1 connection per process: a sender thread streams the
         batch ``calls`` times, the process ``recv_into``s each batch into a
         prefaulted batch-sized buffer; a call's latency is the time between
         two batch completions.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np

from bench.measure import BenchError
from bench.workers import BARRIER_TIMEOUT, Driver

MEMCPY = "memcpy"
TCP = "loopback TCP"


class MemcpyDriver(Driver):
    """The memory-bandwidth limit: copy a batch block by block between two prefaulted buffers."""

    def prepare(self, block_size, batch, dst_blocks):
        both = [np.empty(batch * block_size, dtype=np.uint8), np.zeros(batch * block_size, dtype=np.uint8)]
        self._buffers(block_size, batch, *both)
        self.pairs = [(self.values.block(self.dst, j), self.values.block(self.src, j)) for j in range(batch)]
        self.copy()

    def copy(self) -> None:
        for dst, src in self.pairs:
            np.copyto(dst, src)

    def release(self):
        self.pairs = []
        super().release()


class TcpDriver(Driver):
    """The loopback-socket limit: one 127.0.0.1 connection per worker; a sender thread streams
    each batch, the worker ``recv_into``s it (one batch-sized destination, reused)."""

    def prepare(self, block_size, batch, dst_blocks):
        both = [np.empty(batch * block_size, dtype=np.uint8), np.zeros(batch * block_size, dtype=np.uint8)]
        self._buffers(block_size, batch, *both)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.sender = socket.create_connection(listener.getsockname())
            self.receiver, _ = listener.accept()

    def stream(self, calls: int, barrier) -> tuple[float, float, list[float]]:
        payload = memoryview(self.src)
        view = memoryview(self.dst)
        total = len(view)
        failure: list[BaseException] = []

        def send() -> None:
            try:
                for _ in range(calls):
                    self.sender.sendall(payload)
            except BaseException as exc:  # reported by the receiving side
                failure.append(exc)

        thread = threading.Thread(target=send, name="bench-tcp-sender", daemon=True)
        if barrier is not None:
            barrier.wait(BARRIER_TIMEOUT)
        started = time.perf_counter()
        thread.start()
        stamps = [started]
        for _ in range(calls):
            filled = 0
            while filled < total:
                n = self.receiver.recv_into(view[filled:], total - filled)
                if n == 0:
                    raise BenchError(f"loopback TCP closed early: {failure or 'no error from the sender'}")
                filled += n
            stamps.append(time.perf_counter())
        thread.join()
        view.release()
        payload.release()
        if failure:
            raise BenchError(f"loopback TCP sender failed: {failure[0]!r}")
        if not np.array_equal(self.dst, self.src):
            raise BenchError("loopback TCP delivered different bytes")
        return started, stamps[-1], [b - a for a, b in zip(stamps, stamps[1:])]

    def release(self):
        for sock in (getattr(self, "sender", None), getattr(self, "receiver", None)):
            if sock is not None:
                sock.close()
        self.sender = self.receiver = None
        super().release()
