"""Hand-written protobuf encoding of GetResponse, the one message whose size is
dominated by values: protobuf would copy every value twice (into the message,
then into the serialised bytes); this joins them into the reply once.
A unit test proves the bytes parse as the same GetResponse."""

from __future__ import annotations

_FOUND = b"\x08\x01"  # BlockRead.found = true (field 1, varint)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_get_response(found) -> bytes:
    """Serialise ``GetResponse(results=[BlockRead...])`` for blocks (value, checksum) or None."""
    parts: list[bytes] = []
    for block in found:
        if block is None:
            parts.append(b"\x0a\x00")  # an empty BlockRead: found=false
            continue
        value = block.value
        n = len(value)
        head = _FOUND + b"\x12" + _varint(n)  # value: field 2, length-delimited
        tail = b"\x18" + _varint(n) + b"\x20" + _varint(block.checksum)  # length (3), checksum (4)
        parts.append(b"\x0a" + _varint(len(head) + n + len(tail)) + head)
        parts.append(value)
        parts.append(tail)
    return b"".join(parts)
