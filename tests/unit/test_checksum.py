import numpy as np

from kvstore.checksum import byte_length, checksum


def test_known_vector():
    # Reference values of XXH3_64bits with seed 0.
    assert checksum(b"") == 0x2D06800538D394C2


def test_same_bytes_same_checksum_whatever_the_container():
    data = bytes(range(256)) * 100
    expected = checksum(data)
    assert checksum(bytearray(data)) == expected
    assert checksum(memoryview(data)) == expected
    assert checksum(np.frombuffer(data, dtype=np.uint8)) == expected
    assert checksum(data[:-1] + b"\x00") != expected


def test_byte_length_of_typed_buffers():
    assert byte_length(b"abc") == 3
    assert byte_length(np.zeros(10, dtype=np.float32)) == 40
    assert byte_length(memoryview(bytearray(7))) == 7
