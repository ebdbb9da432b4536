"""RemoteKey: unpacking a peer's packed rkey; corrupted or truncated keys raise
InvalidRemoteKeyError and never reach UCX, so the process survives them."""

from __future__ import annotations

import random
import struct

import pytest
import xxhash

from kvstore import _native, errors

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def registered(shm_context):
    buffer = bytearray(1 << 16)
    with shm_context.register(buffer) as handle:
        yield handle


@pytest.fixture(scope="module")
def loopback(shm_context):
    with _native.Worker(shm_context) as worker:
        yield worker.connect(worker.address)


def test_unpack_and_close(loopback, registered):
    key = loopback.unpack_rkey(registered.packed_rkey)
    assert key.endpoint is loopback
    key.close()
    key.close()  # idempotent
    with loopback.unpack_rkey(bytearray(registered.packed_rkey)) as key:
        pass
    with loopback.unpack_rkey(memoryview(registered.packed_rkey)):
        pass


def test_every_flipped_byte_is_refused(loopback, registered):
    packed = registered.packed_rkey
    for index in range(len(packed)):
        for mask in (0x01, 0x80, 0xFF):
            corrupted = bytearray(packed)
            corrupted[index] ^= mask
            with pytest.raises(_native.InvalidRemoteKeyError) as info:
                loopback.unpack_rkey(bytes(corrupted))
            assert info.value.code == "INVALID_REMOTE_KEY"
            assert isinstance(info.value, errors.InvalidArgumentError)
    # The genuine key still works afterwards.
    loopback.unpack_rkey(packed).close()


def test_every_truncation_is_refused(loopback, registered):
    packed = registered.packed_rkey
    for length in range(len(packed)):
        with pytest.raises(_native.InvalidRemoteKeyError):
            loopback.unpack_rkey(packed[:length])
    with pytest.raises(_native.InvalidRemoteKeyError):
        loopback.unpack_rkey(packed + b"\x00")  # trailing garbage


@pytest.mark.parametrize(
    "packed",
    [b"", b"KVRK", b"\x00" * 64, b"KVRK" + b"\xff" * 60, "not bytes", None, 42],
    ids=["empty", "magic-only", "zeros", "ff", "str", "none", "int"],
)
def test_garbage_is_refused(loopback, packed):
    with pytest.raises(_native.InvalidRemoteKeyError):
        loopback.unpack_rkey(packed)


def frame(raw: bytes) -> bytes:
    """What packed_rkey would look like around ``raw``: the checksum is valid."""
    return struct.pack("<4sIQ", b"KVRK", len(raw), xxhash.xxh3_64_intdigest(raw)) + raw


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00" * 3,  # shorter than the memory-domain map
        struct.pack("<QB", 0b1, 0),  # one domain, no size byte
        struct.pack("<QB", 0b11, 0) + b"\x04abcd",  # two domains, one present
        struct.pack("<QB", 0b1, 0) + b"\x20" + b"x" * 8,  # size past the end
        struct.pack("<QB", 0, 0xEE),  # unknown memory type
    ],
    ids=["short", "no-size", "missing-domain", "overlong", "memory-type"],
)
def test_well_framed_garbage_is_refused_before_ucx(loopback, raw):
    # A valid frame around bytes UCX did not produce: its layout is checked
    # before UCX, which would read past the end of these.
    with pytest.raises(_native.InvalidRemoteKeyError):
        loopback.unpack_rkey(frame(raw))


def test_random_keys_never_crash(loopback, registered):
    rng = random.Random(20240601)
    genuine = registered.packed_rkey[16:]
    for _ in range(500):
        if rng.random() < 0.5:
            raw = rng.randbytes(rng.randrange(64))
        else:
            mutated = bytearray(genuine)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            raw = bytes(mutated)
        try:
            loopback.unpack_rkey(frame(raw)).close()
        except _native.InvalidRemoteKeyError:
            pass
    loopback.unpack_rkey(registered.packed_rkey).close()


def test_region_bounds_must_be_complete_and_sane(loopback, registered):
    packed = registered.packed_rkey
    with pytest.raises(errors.InvalidArgumentError):
        loopback.unpack_rkey(packed, address=registered.address)
    with pytest.raises(errors.InvalidArgumentError):
        loopback.unpack_rkey(packed, address=registered.address, length=0)
    with pytest.raises(errors.InvalidArgumentError):
        loopback.unpack_rkey(packed, address=2**64 - 10, length=100)
    loopback.unpack_rkey(packed, address=registered.address, length=registered.length).close()


def test_closed_endpoint_cannot_unpack(shm_context, registered):
    with _native.Worker(shm_context) as worker:
        endpoint = worker.connect(worker.address)
        endpoint.close()
        with pytest.raises(_native.EndpointClosedError):
            endpoint.unpack_rkey(registered.packed_rkey)
