"""xxh3 over registered memory equals xxhash's, without copying."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest
import xxhash

from kvstore import _native, errors

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(11).integers(0, 256, (4 << 20) + 17, dtype=np.uint8)


@pytest.mark.parametrize("offset", [0, 1, 4095, 1 << 20])
@pytest.mark.parametrize("length", [0, 1, 3, 16, 17, 128, 129, 240, 241, 4096, (3 << 20) + 5])
def test_equals_xxhash(shm_context, data, offset, length):
    with shm_context.register(data) as handle:
        expected = xxhash.xxh3_64_intdigest(data[offset : offset + length].tobytes())
        assert _native.xxh3(handle, offset, length) == expected


def test_other_buffer_kinds(shm_context):
    mapped = mmap.mmap(-1, 1 << 16)
    mapped.write(b"kv" * (1 << 15))
    with shm_context.register(mapped) as handle:
        assert _native.xxh3(handle, 10, 1000) == xxhash.xxh3_64_intdigest(mapped[10:1010])
    mapped.close()
    raw = ctypes.create_string_buffer(b"raw pointer range", 64)
    with shm_context.register_ptr(ctypes.addressof(raw), 64) as handle:
        assert _native.xxh3(handle, 0, 64) == xxhash.xxh3_64_intdigest(raw.raw)


def test_sees_later_writes(shm_context):
    buffer = bytearray(1000)
    with shm_context.register(buffer) as handle:
        before = _native.xxh3(handle, 0, 1000)
        buffer[500] = 1
        assert _native.xxh3(handle, 0, 1000) != before
        assert _native.xxh3(handle, 0, 1000) == xxhash.xxh3_64_intdigest(bytes(buffer))


@pytest.mark.parametrize("offset,length", [(-1, 1), (0, -1), (0, 1001), (1000, 1), (2**63, 1)])
def test_out_of_bounds(shm_context, offset, length):
    with shm_context.register(bytearray(1000)) as handle:
        with pytest.raises(errors.InvalidArgumentError):
            _native.xxh3(handle, offset, length)
