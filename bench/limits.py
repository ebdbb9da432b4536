"""What the machine itself can do for one block size: memcpy and loopback TCP.

These are the ceilings the kvstore numbers are read against: a get through the
SDK can at best move bytes as fast as one TCP connection on 127.0.0.1, and
that connection at best as fast as a memcpy. Each is timed ``repeats`` times
and the best run is kept, as a ceiling should be.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np

from bench.measure import BenchError, Result
from bench.progress import Progress, quiet


def memcpy(block_size: int, blocks: int, *, repeats: int = 3, progress: Progress | None = None) -> Result:
    """Copy one block-sized buffer into a preallocated destination ``blocks`` times."""
    progress = progress or quiet()
    src = np.frombuffer(os.urandom(block_size), dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the destination's pages in before timing
    best = None
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(blocks):
            np.copyto(dst, src)
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
        progress.advance(blocks * block_size)
    if not np.array_equal(dst, src):
        raise BenchError("memcpy produced different bytes")
    return Result("memcpy", block_size, blocks, best)


def tcp_loopback(block_size: int, blocks: int, *, repeats: int = 3, progress: Progress | None = None) -> Result:
    """Send ``blocks`` blocks over one 127.0.0.1 connection from a thread; the
    receiver reads each block into a preallocated buffer with ``recv_into``."""
    progress = progress or quiet()
    payload = os.urandom(block_size)
    received = bytearray(block_size)
    view = memoryview(received)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    best = None
    try:
        for _ in range(repeats):
            failure: list[BaseException] = []

            def send() -> None:
                try:
                    for _ in range(blocks):
                        sender.sendall(payload)
                except BaseException as exc:  # reported by the receiving side
                    failure.append(exc)

            thread = threading.Thread(target=send, name="bench-tcp-sender", daemon=True)
            started = time.perf_counter()
            thread.start()
            for _ in range(blocks):
                filled = 0
                while filled < block_size:
                    n = receiver.recv_into(view[filled:], block_size - filled)
                    if n == 0:
                        raise BenchError(f"loopback TCP closed early: {failure or 'no error from the sender'}")
                    filled += n
            elapsed = time.perf_counter() - started
            thread.join()
            if failure:
                raise BenchError(f"loopback TCP sender failed: {failure[0]!r}")
            best = elapsed if best is None else min(best, elapsed)
            progress.advance(blocks * block_size)
    finally:
        view.release()
        sender.close()
        receiver.close()
    if received != payload:
        raise BenchError("loopback TCP delivered different bytes")
    return Result("loopback TCP", block_size, blocks, best)
