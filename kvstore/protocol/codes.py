"""The wire error codes (``kvstore.v1.ErrorCode`` in ``protos/kvstore/v1/errors.proto``).

Every ``KVStoreError`` carries one of these as ``code``; raise sites name them
as ``ErrorCode.KEY_TOO_LARGE`` so that a code unknown to the contract cannot be
written. A ``StrEnum``: a member equals its name (``ErrorCode.WRONG_NODE ==
"WRONG_NODE"``). ``tests/unit/test_protocol.py`` pins this list to the proto,
name for name and number for number."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """One member per ``kvstore.v1.ErrorCode``; ``number`` is its value on the wire."""

    number: int

    def __new__(cls, name: str, number: int) -> "ErrorCode":
        member = str.__new__(cls, name)
        member._value_ = name
        member.number = number
        return member

    ERROR_CODE_UNSPECIFIED = ("ERROR_CODE_UNSPECIFIED", 0)
    MALFORMED_REQUEST = ("MALFORMED_REQUEST", 100)
    UNKNOWN_FIELD = ("UNKNOWN_FIELD", 101)
    EMPTY_KEY = ("EMPTY_KEY", 102)
    KEY_TOO_LARGE = ("KEY_TOO_LARGE", 103)
    VALUE_TOO_LARGE = ("VALUE_TOO_LARGE", 104)
    LENGTH_MISMATCH = ("LENGTH_MISMATCH", 105)
    CHECKSUM_MISMATCH = ("CHECKSUM_MISMATCH", 106)
    UNKNOWN_DURABILITY = ("UNKNOWN_DURABILITY", 107)
    INVALID_NAMESPACE = ("INVALID_NAMESPACE", 108)
    BATCH_TOO_LARGE = ("BATCH_TOO_LARGE", 109)
    INVALID_ARGUMENT = ("INVALID_ARGUMENT", 110)
    BUFFER_TOO_SMALL = ("BUFFER_TOO_SMALL", 111)
    INVALID_REMOTE_KEY = ("INVALID_REMOTE_KEY", 112)
    UNKNOWN_CLIENT = ("UNKNOWN_CLIENT", 113)
    SHARED_MEMORY_UNAVAILABLE = ("SHARED_MEMORY_UNAVAILABLE", 114)
    INVALID_WORKER_ADDRESS = ("INVALID_WORKER_ADDRESS", 115)
    UNKNOWN_TOKEN = ("UNKNOWN_TOKEN", 116)
    AUTH_OPEN = ("AUTH_OPEN", 117)
    CAPACITY_EXHAUSTED = ("CAPACITY_EXHAUSTED", 200)
    SHUTTING_DOWN = ("SHUTTING_DOWN", 201)
    STORAGE_FAILURE = ("STORAGE_FAILURE", 202)
    DATA_PLANE_UNAVAILABLE = ("DATA_PLANE_UNAVAILABLE", 203)
    TRANSFER_FAILED = ("TRANSFER_FAILED", 204)
    BLOCK_EXCEEDS_MEMORY_TIER = ("BLOCK_EXCEEDS_MEMORY_TIER", 205)
    WRONG_NODE = ("WRONG_NODE", 206)
    RATE_LIMITED = ("RATE_LIMITED", 207)
    TOO_MANY_IN_FLIGHT = ("TOO_MANY_IN_FLIGHT", 208)
    PERMISSION_DENIED = ("PERMISSION_DENIED", 300)
    UNAUTHENTICATED = ("UNAUTHENTICATED", 301)
    UNKNOWN_NAMESPACE = ("UNKNOWN_NAMESPACE", 302)
    DATA_CORRUPTION = ("DATA_CORRUPTION", 400)


BY_NUMBER: dict[int, ErrorCode] = {code.number: code for code in ErrorCode}
