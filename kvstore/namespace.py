"""Namespaces and keys: what a block is addressed by.

Every key lives in a ``Namespace(tenant, subtenant)``. Names are 1-128
characters of ``[A-Za-z0-9._:-]``; keys are 1 to ``MAX_KEY_BYTES`` arbitrary
bytes. ``Namespace.prefix`` is the storage encoding: length-prefixed names, so
no namespace's prefix is a prefix of another's, which makes a namespace one
contiguous key range (listing and dropping it are range operations).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from kvstore.errors import InvalidArgumentError
from kvstore.protocol.codes import ErrorCode

MAX_KEY_BYTES = 1024
MAX_NAME_CHARS = 128
DEFAULT_TENANT = "default"
DEFAULT_SUBTENANT = "default"

_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def validate_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = name[:64] + "..." if isinstance(name, str) and len(name) > 64 else name
        raise InvalidArgumentError(
            f"{kind} {shown!r} is invalid: use 1-{MAX_NAME_CHARS} characters of [A-Za-z0-9._:-]",
            code=ErrorCode.INVALID_NAMESPACE,
        )
    return name


def validate_key(key, index: int = -1) -> bytes:
    """Return ``key`` as bytes, or raise InvalidArgumentError naming what is wrong."""
    if type(key) is bytes and 0 < len(key) <= MAX_KEY_BYTES:  # the common case, first: a batch checks every key
        return key
    if isinstance(key, str):
        raise InvalidArgumentError(f"key {index} is a str; keys are bytes", code=ErrorCode.INVALID_ARGUMENT, index=index)
    if not isinstance(key, bytes):
        if not isinstance(key, (bytearray, memoryview)):
            raise InvalidArgumentError(f"key {index} has type {type(key).__name__}; keys are bytes", index=index)
        key = bytes(key)
    if not key:
        raise InvalidArgumentError(f"key {index} is empty", code=ErrorCode.EMPTY_KEY, index=index)
    if len(key) > MAX_KEY_BYTES:
        raise InvalidArgumentError(
            f"key {index} is {len(key)} bytes; the limit is {MAX_KEY_BYTES}", code=ErrorCode.KEY_TOO_LARGE, index=index
        )
    return key


@dataclass(frozen=True, slots=False)
class Namespace:
    """A validated (tenant, subtenant) pair."""

    tenant: str = DEFAULT_TENANT
    subtenant: str = DEFAULT_SUBTENANT

    def __post_init__(self) -> None:
        validate_name("tenant", self.tenant)
        validate_name("subtenant", self.subtenant)

    @cached_property
    def prefix(self) -> bytes:
        t, s = self.tenant.encode(), self.subtenant.encode()
        return bytes([len(t)]) + t + bytes([len(s)]) + s

    def storage_key(self, key: bytes) -> bytes:
        return self.prefix + key

    @classmethod
    def from_prefix(cls, encoded: bytes) -> tuple["Namespace", bytes]:
        """Split a storage key back into its namespace and user key."""
        tlen = encoded[0]
        tenant = encoded[1 : 1 + tlen].decode()
        slen = encoded[1 + tlen]
        start = 2 + tlen
        subtenant = encoded[start : start + slen].decode()
        return cls(tenant, subtenant), encoded[start + slen :]

    def __str__(self) -> str:
        return f"{self.tenant}/{self.subtenant}"


def range_end(prefix: bytes) -> bytes:
    """The smallest byte string greater than every string that starts with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        raise ValueError("prefix of only 0xff bytes has no upper bound")
    return trimmed[:-1] + bytes([trimmed[-1] + 1])
