"""The daemon side of the error seam: a KVStoreError becomes a gRPC status whose
trailing metadata carries a ``kvstore.v1.ErrorDetail`` under ``kvstore-error-bin``."""

from __future__ import annotations

import grpc

from kvstore import errors
from kvstore._proto.v1 import errors_pb2

ERROR_DETAIL_KEY = "kvstore-error-bin"

_STATUS = [
    (errors.WrongNodeError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.DataCorruptionError, grpc.StatusCode.DATA_LOSS),
]


def status_of(error: errors.KVStoreError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def trailing_metadata(error: errors.KVStoreError) -> tuple[tuple[str, bytes], ...]:
    code = errors_pb2.ErrorCode.Value(error.code) if error.code in errors_pb2.ErrorCode.keys() else 0
    detail = errors_pb2.ErrorDetail(code=code, message=error.message, index=error.index)
    return ((ERROR_DETAIL_KEY, detail.SerializeToString()),)
