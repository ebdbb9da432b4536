"""read_process_blocks / write_process_blocks: blocks copied between a local
buffer and another process's memory (process_vm_readv/writev), hashed piece
by piece: the checksums are exactly xxh3-64 of the bytes, whatever the piece
boundaries; failures come back as errno, not as a crash."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from kvstore import _native, errors

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not _native.available() or not sys.platform.startswith("linux"), reason="no native module or not Linux"),
]

PIECE = 256 << 10  # kProcessCopyPiece


def xxh3(data) -> int:
    return xxhash.xxh3_64_intdigest(bytes(data))


@pytest.fixture
def source() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, 8 << 20, dtype=np.uint8)


@pytest.mark.parametrize(
    "size", [0, 1, 16, 240, 241, 1023, 1024, 1025, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 17, 5 << 20]
)
def test_reads_hash_exactly_across_piece_boundaries(source, size):
    address = source.ctypes.data
    destination = bytearray(size + 11)
    checksums, failed, error = _native.read_process_blocks(os.getpid(), destination, [11], [address + 3], [size])
    assert (failed, error) == (-1, 0)
    assert checksums == [xxh3(source[3 : 3 + size])]
    assert bytes(destination[11:]) == source[3 : 3 + size].tobytes()


@pytest.mark.parametrize("threads", [1, 2])
def test_writes_land_and_hash_the_source(source, threads):
    target = np.zeros(len(source), dtype=np.uint8)
    sizes = [1 << 20] * 6 + [PIECE + 5, 100]
    offsets = np.cumsum([0] + sizes[:-1]).tolist()
    checksums, failed, _ = _native.write_process_blocks(
        os.getpid(), source, offsets, [target.ctypes.data + o for o in offsets], sizes, threads=threads
    )
    assert failed == -1
    assert checksums == [xxh3(source[o : o + n]) for o, n in zip(offsets, sizes)]
    end = offsets[-1] + sizes[-1]
    assert np.array_equal(target[:end], source[:end])


def test_a_batch_on_two_threads_equals_one(source):
    sizes = [1 << 20] * 8
    offsets = [i << 20 for i in range(8)]
    results = []
    for threads in (1, 2):
        out = bytearray(len(source))
        results.append(
            (_native.read_process_blocks(os.getpid(), out, offsets, [source.ctypes.data + o for o in offsets], sizes, threads=threads), out)
        )
    assert results[0] == results[1]
    assert results[0][1] == source.tobytes()


def test_another_process_memory_is_read_and_written():
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, ctypes; b = ctypes.create_string_buffer(b'kvstore' * 1000, 7000);"
         " print(ctypes.addressof(b), flush=True); sys.stdin.read(); print(b.raw[:7].decode(), flush=True)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        address = int(child.stdout.readline())
        out = bytearray(7000)
        checksums, failed, error = _native.read_process_blocks(child.pid, out, [0], [address], [7000])
        if error == errno.EPERM:
            pytest.skip("this process may not read its child (ptrace scope)")
        assert failed == -1 and bytes(out) == b"kvstore" * 1000 and checksums == [xxh3(out)]
        _, failed, _ = _native.write_process_blocks(child.pid, b"KVSTORE", [0], [address], [7])
        assert failed == -1
        assert child.communicate("", timeout=30)[0].strip() == "KVSTORE"
    finally:
        child.kill()
        child.wait()


def test_unmapped_memory_is_efault_with_the_first_failed_index(source):
    out = bytearray(3 << 20)
    addresses = [source.ctypes.data, 4096, source.ctypes.data]
    checksums, failed, error = _native.read_process_blocks(os.getpid(), out, [0, 1 << 20, 2 << 20], addresses, [1 << 20] * 3)
    assert (failed, error) == (1, errno.EFAULT)
    assert checksums[0] == xxh3(source[: 1 << 20])


def test_a_range_running_off_the_mapping_is_efault():
    page = ctypes.create_string_buffer(4096)
    _, failed, error = _native.read_process_blocks(os.getpid(), bytearray(1 << 30), [0], [ctypes.addressof(page)], [1 << 30])
    assert (failed, error) == (0, errno.EFAULT)


def test_a_process_that_is_gone_is_esrch():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    _, failed, error = _native.read_process_blocks(child.pid, bytearray(8), [0], [4096], [8])
    assert (failed, error) == (0, errno.ESRCH)


def test_local_ranges_outside_the_buffer_are_refused_before_any_copy(source):
    out = bytearray(100)
    with pytest.raises(errors.InvalidArgumentError) as info:
        _native.read_process_blocks(os.getpid(), out, [0, 50], [source.ctypes.data] * 2, [10, 51])
    assert info.value.index == 1
    assert out == bytearray(100)
    with pytest.raises(errors.InvalidArgumentError):
        _native.read_process_blocks(os.getpid(), out, [-1], [source.ctypes.data], [1])
    with pytest.raises(errors.InvalidArgumentError):
        _native.read_process_blocks(os.getpid(), out, [0], [(1 << 64) - 4], [10])
    with pytest.raises(errors.InvalidArgumentError):
        _native.read_process_blocks(0, out, [0], [source.ctypes.data], [1])
    with pytest.raises(errors.InvalidArgumentError):  # a read needs a writable destination
        _native.read_process_blocks(os.getpid(), b"read-only", [0], [source.ctypes.data], [1])
