"""Block checksums: xxh3-64 over the block's bytes, computed by the writer,
verified by the daemon on write and by the SDK on read."""

from __future__ import annotations

import xxhash


def checksum(data) -> int:
    """xxh3-64 of any bytes-like object (bytes, bytearray, memoryview, numpy array)."""
    return xxhash.xxh3_64_intdigest(data)


def byte_length(data) -> int:
    """Length in bytes of a bytes-like object, whatever its item size or shape."""
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    return memoryview(data).nbytes
