"""copy_blocks: byte-exact copies between two buffers, with the xxh3-64 of each
block computed in the same pass (equal to xxhash's), bounds-checked."""

from __future__ import annotations

import mmap
import threading

import numpy as np
import pytest
import xxhash

from kvstore import _native, errors

pytestmark = pytest.mark.timeout(120)

SIZES = [0, 1, 15, 16, 17, 63, 64, 65, 240, 241, 1023, 1024, 1025, 4096, 65_537, 1 << 20, (3 << 20) + 7]


def random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("alignment", [(0, 0), (1, 3), (13, 64)])
def test_one_block_is_copied_and_hashed_exactly(size, alignment):
    src_off, dst_off = alignment
    src = random_bytes(size + 64, size)
    dst = np.zeros(size + 128, dtype=np.uint8)
    (digest,) = _native.copy_blocks(dst, [dst_off], src, [src_off], [size])
    assert digest == xxhash.xxh3_64_intdigest(src[src_off : src_off + size])
    assert np.array_equal(dst[dst_off : dst_off + size], src[src_off : src_off + size])
    assert not dst[:dst_off].any() and not dst[dst_off + size :].any()  # nothing outside the range


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_large_batches_stream_and_use_helper_threads(threads):
    # Over 4 MiB in all: streaming stores, and helpers when threads > 1.
    sizes = [(1 << 20) + i for i in range(12)] + [5, 300, 1024]
    src = random_bytes(sum(sizes) + 4096, 7)
    dst = np.zeros(sum(sizes) + 8192, dtype=np.uint8)
    src_offsets = np.cumsum([0] + sizes[:-1]).tolist()
    dst_offsets = [o + 3 * i for i, o in enumerate(src_offsets)]  # shifted: unaligned destinations
    digests = _native.copy_blocks(dst, dst_offsets, src, src_offsets, sizes, threads=threads)
    for s, d, n, h in zip(src_offsets, dst_offsets, sizes, digests):
        assert h == xxhash.xxh3_64_intdigest(src[s : s + n])
        assert np.array_equal(dst[d : d + n], src[s : s + n])


def test_concurrent_batches_share_the_helper_pool():
    size, count = 1 << 20, 8
    src = random_bytes(size * count, 3)
    expected = [xxhash.xxh3_64_intdigest(src[i * size : (i + 1) * size]) for i in range(count)]
    failures = []

    def run():
        dst = np.zeros(size * count, dtype=np.uint8)
        offsets = [i * size for i in range(count)]
        for _ in range(5):
            if _native.copy_blocks(dst, offsets, src, offsets, [size] * count, threads=2) != expected:
                failures.append("digest")
            if not np.array_equal(dst, src):
                failures.append("bytes")

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_mmap_and_memoryview_buffers():
    with mmap.mmap(-1, 1 << 16) as m:
        src = bytes(range(256)) * 64
        (digest,) = _native.copy_blocks(m, [100], memoryview(src), [0], [len(src)])
        assert m[100 : 100 + len(src)] == src
        assert digest == xxhash.xxh3_64_intdigest(src)


def test_ranges_outside_either_buffer_name_their_index():
    src, dst = bytearray(100), bytearray(100)
    with pytest.raises(errors.InvalidArgumentError, match="outside the destination") as err:
        _native.copy_blocks(dst, [0, 90], src, [0, 0], [10, 20])
    assert err.value.index == 1
    with pytest.raises(errors.InvalidArgumentError, match="outside the source") as err:
        _native.copy_blocks(dst, [0], src, [95], [10])
    assert err.value.index == 0
    with pytest.raises(errors.InvalidArgumentError, match="outside"):
        _native.copy_blocks(dst, [-1], src, [0], [1])
    with pytest.raises(errors.InvalidArgumentError, match="outside"):
        _native.copy_blocks(dst, [0], src, [0], [-1])
    with pytest.raises(errors.InvalidArgumentError, match="outside"):
        _native.copy_blocks(dst, [2**62], src, [0], [2**62])  # no overflow past the bounds check
    with pytest.raises(errors.InvalidArgumentError, match="differ in length"):
        _native.copy_blocks(dst, [0], src, [0, 1], [1])
    assert dst == bytearray(100)  # nothing was copied


def test_the_destination_must_be_writable_and_open():
    with pytest.raises(errors.InvalidArgumentError, match="writable"):
        _native.copy_blocks(b"read-only", [0], bytearray(4), [0], [1])
    m = mmap.mmap(-1, 4096)
    m.close()
    with pytest.raises(errors.InvalidArgumentError, match="destination"):
        _native.copy_blocks(m, [0], bytearray(4), [0], [1])

