"""The one table between kvstore's error tree and gRPC statuses, used both ways.

A daemon's ``KVStoreError`` leaves as the status its class maps to, with a
``kvstore.v1.ErrorDetail`` (code, message, batch index) in the trailing
metadata (``metadata.ERROR_DETAIL``) or in a local-channel error frame. A
client turns the status and the detail back into the same class, code, message
and index: ``error_from_status(*wire_of(error))`` round-trips, which
``tests/unit/test_protocol.py`` checks for every class and every code.
Subclasses that never cross the wire (``ConfigError``, the native module's
transport errors) arrive as the nearest class of the table.
"""

from __future__ import annotations

import grpc

from kvstore import errors
from kvstore._proto.v1 import errors_pb2
from kvstore.protocol.codes import BY_NUMBER, ErrorCode
from kvstore.protocol.metadata import ERROR_DETAIL

Status = grpc.StatusCode

# Most specific class first: an error leaves as the first row it is an instance
# of (a row with a code only when the error has that code), and a status arrives
# as the class of its first row that matches, a row with a code matching only
# that code (FAILED_PRECONDITION means two things; a PermissionDeniedError leaves
# as UNAUTHENTICATED when its credential was not valid at all).
TABLE: tuple[tuple[type[errors.KVStoreError], Status, ErrorCode | None], ...] = (
    (errors.SessionLostError, Status.FAILED_PRECONDITION, ErrorCode.UNKNOWN_CLIENT),
    (errors.WrongNodeError, Status.FAILED_PRECONDITION, None),
    (errors.InvalidArgumentError, Status.INVALID_ARGUMENT, None),
    (errors.UnavailableError, Status.UNAVAILABLE, None),
    (errors.DeadlineExceededError, Status.DEADLINE_EXCEEDED, None),
    (errors.ResourceExhaustedError, Status.RESOURCE_EXHAUSTED, None),
    (errors.PermissionDeniedError, Status.UNAUTHENTICATED, ErrorCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, Status.PERMISSION_DENIED, None),
    (errors.DataCorruptionError, Status.DATA_LOSS, None),
    (errors.InternalError, Status.INTERNAL, None),
)
# Statuses a daemon never sends but gRPC itself, a proxy or an older peer may.
RECEIVED_ONLY: dict[Status, type[errors.KVStoreError]] = {
    Status.OUT_OF_RANGE: errors.InvalidArgumentError,
    Status.CANCELLED: errors.UnavailableError,
    # A proxy's or gRPC's own (no kvstore ErrorDetail with it).
    Status.UNAUTHENTICATED: errors.PermissionDeniedError,
}
BY_STATUS_NUMBER: dict[int, Status] = {status.value[0]: status for status in Status}


def status_of(error: errors.KVStoreError) -> Status:
    for cls, status, code in TABLE:
        if isinstance(error, cls) and (code is None or code == error.code):
            return status
    return Status.INTERNAL


def _class_of(status: Status, code: str | None) -> type[errors.KVStoreError]:
    for cls, row_status, row_code in TABLE:
        if row_status == status and (row_code is None or row_code == code):
            return cls
    return RECEIVED_ONLY.get(status, errors.InternalError)


def detail_of(error: errors.KVStoreError) -> bytes:
    """The serialized ErrorDetail of ``error``."""
    code = ErrorCode.__members__.get(str(error.code))
    number = code.number if code is not None else 0
    return errors_pb2.ErrorDetail(code=number, message=error.message, index=error.index).SerializeToString()


def wire_of(error: errors.KVStoreError) -> tuple[Status, str, bytes]:
    """(status, details, serialized ErrorDetail): what ``error`` leaves a daemon as."""
    return status_of(error), error.message, detail_of(error)


def trailing_metadata(error: errors.KVStoreError) -> tuple[tuple[str, bytes], ...]:
    return ((ERROR_DETAIL, detail_of(error)),)


def error_from_status(
    status: Status, details: str | None, detail: bytes | None = None, endpoint: str = ""
) -> errors.KVStoreError:
    """The error a status, its details and a serialized ErrorDetail stand for; its
    message names the status and ``endpoint`` (who answered)."""
    message = details or status.name
    code: str | None = None
    index = -1
    if detail:
        parsed = errors_pb2.ErrorDetail.FromString(detail)
        code = BY_NUMBER.get(parsed.code, ErrorCode.ERROR_CODE_UNSPECIFIED)
        index = parsed.index
        message = parsed.message or message
    cls = _class_of(status, code)
    where = f" from {endpoint}" if endpoint else ""
    return cls(f"{message} [{status.name}{where}]", code=code, index=index)


def error_from_rpc(exc: grpc.RpcError, endpoint: str = "") -> errors.KVStoreError:
    """The error of a failed gRPC call, with the daemon's ErrorDetail if it sent one."""
    detail = None
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_DETAIL:
            detail = value
    return error_from_status(exc.code(), exc.details(), detail, endpoint)
