"""Storage layout micro-benchmark: why block values live in segment files.

Writes the same 1 MiB values three ways, each without and with making them
durable at the end:

  rocksdb blob files     values in RocksDB itself, with integrated BlobDB
  segment file + index   values appended to a segment file, RocksDB holding
                         only a small (segment, offset, length) entry: the
                         daemon's layout
  plain file             the values written sequentially to one file: what
                         the page cache and disk allow at all
"""

from __future__ import annotations

import os
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path

import rocksdict

from bench.measure import Result
from bench.progress import Progress, quiet

INDEX_ENTRY = struct.Struct("<QQQ")  # segment id, offset, length
ENDINGS = ("no sync", "fsync")


def _key(i: int) -> bytes:
    return b"block-%08d" % i


def write_rocksdb_blobs(directory: Path, values: list[bytes], count: int, *, durable: bool) -> float:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_enable_blob_files(True)
    options.set_min_blob_size(4096)
    db = rocksdict.Rdict(str(directory / "rocksdb"), options)
    try:
        started = time.perf_counter()
        for i in range(count):
            db.put(_key(i), values[i % len(values)])
        if durable:
            db.flush(True)  # memtable to blob files: the second write of every value
            db.flush_wal(True)
        return time.perf_counter() - started
    finally:
        db.close()


def write_segment(directory: Path, values: list[bytes], count: int, *, durable: bool) -> float:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    index = rocksdict.Rdict(str(directory / "index"), options)
    fd = os.open(directory / "0000000001.seg", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        started = time.perf_counter()
        offset = 0
        for i in range(count):
            value = values[i % len(values)]
            written = os.pwrite(fd, value, offset)
            if written != len(value):
                raise OSError(f"short write: {written} of {len(value)} bytes")
            index.put(_key(i), INDEX_ENTRY.pack(1, offset, len(value)))
            offset += len(value)
        if durable:
            os.fsync(fd)
            index.flush_wal(True)
        return time.perf_counter() - started
    finally:
        os.close(fd)
        index.close()


def write_plain(directory: Path, values: list[bytes], count: int, *, durable: bool) -> float:
    fd = os.open(directory / "plain.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        started = time.perf_counter()
        for i in range(count):
            value = values[i % len(values)]
            view = memoryview(value)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)


LAYOUTS = {
    "rocksdb blob files": write_rocksdb_blobs,
    "segment file + index": write_segment,
    "plain file": write_plain,
}


def run_storage(
    directory: str | os.PathLike,
    *,
    count: int = 256,
    value_size: int = 1 << 20,
    repeats: int = 3,
    progress: Progress | None = None,
) -> list[Result]:
    """Median time of ``repeats`` runs for each layout and ending, as Results named "LAYOUT, ENDING"."""
    progress = progress or quiet()
    values = [os.urandom(value_size) for _ in range(4)]  # random: nothing to compress
    times: dict[tuple[str, str], list[float]] = {}
    # Runs are interleaved so that a slow spell of the disk does not land on one layout only.
    for _ in range(repeats):
        for ending in ENDINGS:
            for layout, write in LAYOUTS.items():
                progress.stage(f"{layout}, {ending}")
                target = Path(tempfile.mkdtemp(prefix="layout-", dir=directory))
                try:
                    os.sync()  # earlier runs' dirty pages must not be written back during this one
                    seconds = write(target, values, count, durable=ending == "fsync")
                finally:
                    shutil.rmtree(target, ignore_errors=True)
                times.setdefault((layout, ending), []).append(seconds)
                progress.advance(count * value_size)
    return [
        Result(f"{layout}, {ending}", value_size, count, statistics.median(times[(layout, ending)]))
        for ending in ENDINGS
        for layout in LAYOUTS
    ]


def total_bytes(count: int, value_size: int, repeats: int) -> int:
    return count * value_size * repeats * len(ENDINGS) * len(LAYOUTS)
