"""A peer process for cross-process data-plane tests.

Run as ``python peer.py TLS LENGTH``: registers LENGTH bytes filled with
``pattern(LENGTH)``, prints one JSON line (worker address, packed rkey,
buffer address, length, pid), then answers commands on stdin, one per line:
``xxh3`` prints the xxh3-64 of its buffer, ``fill`` restores the pattern and
prints ``ok``. It exits when stdin closes.
"""

from __future__ import annotations

import json
import sys

import numpy as np

LOOPBACK = {"NET_DEVICES": "lo"}  # keep UCX's TCP on 127.0.0.1


def pattern(length: int) -> np.ndarray:
    """Deterministic bytes: offset modulo 251 (a prime, so no power-of-two period)."""
    return np.resize(np.arange(251, dtype=np.uint8), length)


def main() -> None:
    from kvstore import _native

    tls, length = sys.argv[1], int(sys.argv[2])
    context = _native.Context(tls, settings=LOOPBACK)
    worker = _native.Worker(context)
    buffer = pattern(length)
    handle = context.register(buffer)
    print(
        json.dumps(
            {
                "address": worker.address.hex(),
                "rkey": handle.packed_rkey.hex(),
                "buffer": handle.address,
                "length": handle.length,
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        command = line.strip()
        if command == "xxh3":
            print(_native.xxh3(handle, 0, length), flush=True)
        elif command == "fill":
            buffer[:] = pattern(length)
            print("ok", flush=True)
    handle.close()
    worker.close()


if __name__ == "__main__":
    main()
