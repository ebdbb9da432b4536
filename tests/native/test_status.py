"""Failure families: UCX status codes to kvstore.errors classes, one mapping."""

from __future__ import annotations

import pytest

from kvstore import _native, errors

# UCX status codes (ucs/type/status.h).
UCS_ERR_NO_RESOURCE = -2
UCS_ERR_IO_ERROR = -3
UCS_ERR_NO_MEMORY = -4
UCS_ERR_UNREACHABLE = -6
UCS_ERR_CANCELED = -16
UCS_ERR_TIMED_OUT = -20
UCS_ERR_NOT_CONNECTED = -24
UCS_ERR_CONNECTION_RESET = -25
UCS_ERR_FIRST_LINK_FAILURE = -40
UCS_ERR_ENDPOINT_TIMEOUT = -80


@pytest.mark.parametrize(
    "status,cls",
    [
        (UCS_ERR_CONNECTION_RESET, _native.EndpointClosedError),
        (UCS_ERR_ENDPOINT_TIMEOUT, _native.EndpointClosedError),
        (UCS_ERR_UNREACHABLE, _native.EndpointClosedError),
        (UCS_ERR_NOT_CONNECTED, _native.EndpointClosedError),
        (UCS_ERR_CANCELED, _native.EndpointClosedError),
        (UCS_ERR_FIRST_LINK_FAILURE, _native.EndpointClosedError),
        (UCS_ERR_TIMED_OUT, _native.TransportTimeoutError),
        (UCS_ERR_IO_ERROR, _native.TransportError),
        (UCS_ERR_NO_MEMORY, _native.TransportError),  # only registration makes it RegistrationError
        (UCS_ERR_NO_RESOURCE, _native.TransportError),
        (-99, _native.TransportError),
    ],
)
def test_error_for_status(status, cls):
    exc = _native.error_for_status(status, "what failed")
    assert type(exc) is cls
    assert exc.status == status
    assert str(exc) == "what failed"
    assert _native.error_for_status(status).message  # UCX's own description


def test_the_tree():
    assert issubclass(_native.TransportError, errors.UnavailableError)
    assert issubclass(_native.EndpointClosedError, _native.TransportError)
    assert issubclass(_native.TransportTimeoutError, errors.DeadlineExceededError)
    assert issubclass(_native.RegistrationError, errors.ResourceExhaustedError)
    assert issubclass(_native.InvalidRemoteKeyError, errors.InvalidArgumentError)
    for cls in (_native.TransportError, _native.TransportTimeoutError, _native.RegistrationError):
        assert cls("x").retryable
    assert not _native.InvalidRemoteKeyError("x").retryable


def test_codes():
    assert _native.TransportError("x").code == "TRANSFER_FAILED"
    assert _native.EndpointClosedError("x").code == "TRANSFER_FAILED"
    assert _native.TransportTimeoutError("x").code == "TRANSFER_FAILED"
    assert _native.RegistrationError("x").code == "CAPACITY_EXHAUSTED"
    assert _native.InvalidRemoteKeyError("x").code == "INVALID_REMOTE_KEY"


def test_public_names():
    assert sorted(_native.__all__) == [
        "Context",
        "Endpoint",
        "EndpointClosedError",
        "InvalidRemoteKeyError",
        "MemoryHandle",
        "RegistrationError",
        "RemoteKey",
        "TransportError",
        "TransportTimeoutError",
        "Worker",
        "available",
        "copy_blocks",
        "error_for_status",
        "read_process_blocks",
        "unavailable_reason",
        "write_process_blocks",
        "xxh3",
    ]
    for name in _native.__all__:
        assert hasattr(_native, name)
