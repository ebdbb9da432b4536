"""MemoryHandle: registering every kind of buffer, releasing it, and the packed rkey."""

from __future__ import annotations

import ctypes
import gc
import mmap
import struct

import numpy as np
import pytest
import xxhash

from kvstore import _native, errors

pytestmark = pytest.mark.timeout(60)


def writable_buffers():
    """(name, factory) of every writable buffer kind register() accepts."""
    return [
        ("bytearray", lambda: bytearray(b"\x01" * 4096)),
        ("numpy", lambda: np.arange(1024, dtype=np.uint32)),
        ("numpy-2d", lambda: np.zeros((16, 64), dtype=np.float64)),
        ("numpy-fortran", lambda: np.asfortranarray(np.zeros((16, 64), dtype=np.uint8))),
        ("mmap", lambda: mmap.mmap(-1, 1 << 16)),
        ("memoryview-bytearray", lambda: memoryview(bytearray(4096))),
        ("memoryview-slice", lambda: memoryview(bytearray(8192))[1000:5000]),
        ("memoryview-numpy", lambda: memoryview(np.zeros(512, dtype=np.int64))),
        ("ctypes-array", lambda: (ctypes.c_char * 4096)()),
    ]


@pytest.mark.parametrize("name,make", writable_buffers(), ids=[n for n, _ in writable_buffers()])
def test_register_and_release_each_buffer_kind(shm_context, name, make):
    buffer = make()
    view = memoryview(buffer)
    handle = shm_context.register(buffer)
    assert handle.length == view.nbytes
    assert handle.address == np.asarray(view).ctypes.data
    assert handle.packed_rkey[:4] == b"KVRK"
    assert not handle.closed
    handle.close()
    handle.close()  # idempotent
    assert handle.closed
    view.release()


def test_register_reports_the_buffer_address(shm_context):
    array = np.zeros(4096, dtype=np.uint8)
    with shm_context.register(array) as handle:
        assert handle.address == array.ctypes.data
        assert handle.length == 4096
    sliced = memoryview(bytearray(8192))[100:200]
    with shm_context.register(sliced) as handle:
        assert handle.length == 100


@pytest.mark.parametrize(
    "make",
    [
        lambda: b"read-only bytes",
        lambda: memoryview(b"read-only view"),
        lambda: np.frombuffer(b"\x00" * 64, dtype=np.uint8),  # read-only array
        lambda: np.zeros((8, 8), dtype=np.uint8)[:, ::2],  # not contiguous
        lambda: bytearray(),  # empty
        lambda: "a str is not a buffer",
        lambda: 12345,
    ],
    ids=["bytes", "memoryview-bytes", "numpy-readonly", "numpy-strided", "empty", "str", "int"],
)
def test_unregistrable_buffers_raise_invalid_argument(shm_context, make):
    with pytest.raises(errors.InvalidArgumentError) as info:
        shm_context.register(make())
    assert info.value.code == "INVALID_ARGUMENT"


def test_read_only_mmap_is_rejected(shm_context, tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"\x00" * 4096)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with pytest.raises(errors.InvalidArgumentError):
            shm_context.register(mapped)


def test_file_backed_mmap(shm_context, tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"\x07" * 8192)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        handle = shm_context.register(mapped)
        assert handle.length == 8192
        assert _native.xxh3(handle, 0, 8192) == xxhash.xxh3_64_intdigest(b"\x07" * 8192)
        handle.close()


def test_registration_holds_the_buffer_until_closed(shm_context):
    buffer = bytearray(4096)
    handle = shm_context.register(buffer)
    with pytest.raises(BufferError):
        buffer.extend(b"x")  # exported: cannot move while UCX may touch it
    handle.close()
    buffer.extend(b"x")  # released
    assert len(buffer) == 4097

    mapped = mmap.mmap(-1, 4096)
    handle = shm_context.register(mapped)
    with pytest.raises(BufferError):
        mapped.close()
    handle.close()
    mapped.close()


def test_registration_keeps_the_buffer_alive(shm_context):
    handle = shm_context.register(bytearray(b"\x05" * 1000))  # no other reference
    gc.collect()
    assert _native.xxh3(handle, 0, 1000) == xxhash.xxh3_64_intdigest(b"\x05" * 1000)
    handle.close()


def test_register_ptr_raw_ranges(shm_context):
    raw = ctypes.create_string_buffer(8192)
    handle = shm_context.register_ptr(ctypes.addressof(raw), 8192)
    assert (handle.address, handle.length) == (ctypes.addressof(raw), 8192)
    handle.close()

    array = np.ones(1 << 20, dtype=np.uint8)
    with shm_context.register_ptr(array.ctypes.data, array.nbytes) as handle:
        assert handle.length == 1 << 20


@pytest.mark.parametrize("address,length", [(0, 10), (-1, 10), (4096, 0), (4096, -5), ("1", 2)])
def test_register_ptr_rejects_bad_ranges(shm_context, address, length):
    with pytest.raises(errors.InvalidArgumentError):
        shm_context.register_ptr(address, length)


def test_closed_handle_refuses_use(shm_context):
    handle = shm_context.register(bytearray(64))
    handle.close()
    with pytest.raises(errors.InvalidArgumentError):
        _ = handle.packed_rkey
    with pytest.raises(errors.InvalidArgumentError):
        _native.xxh3(handle, 0, 64)


def test_packed_rkey_framing(shm_context):
    with shm_context.register(bytearray(4096)) as handle:
        packed = handle.packed_rkey
        assert packed is handle.packed_rkey  # cached
        magic, length, digest = struct.unpack_from("<4sIQ", packed)
        assert magic == b"KVRK"
        assert length == len(packed) - 16 > 0
        assert digest == xxhash.xxh3_64_intdigest(packed[16:])


def test_many_registrations(shm_context):
    buffers = [bytearray(4096) for _ in range(200)]
    handles = [shm_context.register(b) for b in buffers]
    assert len({h.address for h in handles}) == 200
    for handle in handles:
        handle.close()
