"""The one exception tree of kvstore, shared by the SDK, the daemon and the CLI.

    KVStoreError                      base of everything kvstore raises
    ├── RetryableError                the same call may succeed later
    │   ├── UnavailableError          daemon down, unreachable, draining   (UNAVAILABLE)
    │   │   └── TransportError        the data plane (UCX) failed to move bytes
    │   │       └── EndpointClosedError   the peer died or its endpoint closed
    │   ├── WrongNodeError            routed with a stale cluster map      (FAILED_PRECONDITION)
    │   ├── SessionLostError          the daemon has no such data-plane session: Hello again
    │   │                                                                  (FAILED_PRECONDITION)
    │   ├── DeadlineExceededError     no answer within the deadline        (DEADLINE_EXCEEDED)
    │   │   └── TransportTimeoutError UCX gave up waiting for the transport
    │   └── ResourceExhaustedError    memory/disk/quota full               (RESOURCE_EXHAUSTED)
    │       └── RegistrationError     memory could not be registered with UCX
    ├── InvalidArgumentError          the request is wrong; never retry    (INVALID_ARGUMENT)
    │   ├── ConfigError               a configuration value is wrong
    │   └── InvalidRemoteKeyError     a packed remote key is corrupted or foreign
    ├── PermissionDeniedError         bad or missing credentials           (PERMISSION_DENIED)
    ├── DataCorruptionError           bytes failed their checksum          (DATA_LOSS)
    └── InternalError                 a bug or an unexpected failure       (INTERNAL, others)

Every error carries ``code`` (an ``ErrorCode``, the ``kvstore.v1.ErrorCode``
name such as ``"KEY_TOO_LARGE"``) and ``index`` (the offending entry of a
batch, or -1). One table maps this tree to gRPC statuses and back,
``kvstore.protocol.status``, for the daemon and the SDK alike; UCX statuses
are translated in ``kvstore._native``.
"""

from __future__ import annotations

from kvstore.protocol.codes import ErrorCode


class KVStoreError(Exception):
    """Base class of every error raised by kvstore."""

    retryable: bool = False
    default_code: str = ErrorCode.ERROR_CODE_UNSPECIFIED

    def __init__(self, message: str, *, code: ErrorCode | str | None = None, index: int = -1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.index = index

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r}, index={self.index})"


class RetryableError(KVStoreError):
    """The same call may succeed if retried later or against another replica."""

    retryable = True


class UnavailableError(RetryableError):
    """The daemon is down, unreachable or draining."""

    

class WrongNodeError(RetryableError):
    """The daemon does not own the key under its cluster map: refresh the map and resend."""

    default_code = ErrorCode.WRONG_NODE


class SessionLostError(RetryableError):
    """The daemon does not know the data-plane session a request named (it restarted,
    the session expired or failed): say Hello again, then resend."""

    default_code = ErrorCode.UNKNOWN_CLIENT


class DeadlineExceededError(RetryableError):
    """The call did not finish within its deadline."""


class ResourceExhaustedError(RetryableError):
    """The daemon has no room for the request (memory, disk or quota)."""

    default_code = ErrorCode.CAPACITY_EXHAUSTED


class InvalidArgumentError(KVStoreError):
    """The request is malformed or violates a limit; retrying cannot help."""

    default_code = ErrorCode.INVALID_ARGUMENT


class ConfigError(InvalidArgumentError):
    """A configuration value is missing or wrong; the message names the field."""


class PermissionDeniedError(KVStoreError):
    """The caller may not do this."""

    default_code = ErrorCode.PERMISSION_DENIED


class DataCorruptionError(KVStoreError):
    """Bytes failed their checksum; they are never handed to the caller."""

    default_code = ErrorCode.DATA_CORRUPTION


class InternalError(KVStoreError):
    """An unexpected failure inside kvstore."""


class TransportError(UnavailableError):
    """The data plane failed to move bytes; the operation may be retried."""

    default_code = ErrorCode.TRANSFER_FAILED
    status: int | None = None  # the UCX status, when UCX reported one


class EndpointClosedError(TransportError):
    """The endpoint is gone: the peer died, the link broke, or it (or its worker) was closed."""


class TransportTimeoutError(DeadlineExceededError):
    """UCX gave up waiting for the transport."""

    default_code = ErrorCode.TRANSFER_FAILED
    status: int | None = None


class RegistrationError(ResourceExhaustedError):
    """Memory could not be registered: no memory or resources left."""

    status: int | None = None


class InvalidRemoteKeyError(InvalidArgumentError):
    """A packed remote key is corrupted, truncated or was not made for this peer."""

    default_code = ErrorCode.INVALID_REMOTE_KEY
    status: int | None = None


__all__ = [
    "ConfigError",
    "DataCorruptionError",
    "DeadlineExceededError",
    "EndpointClosedError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidRemoteKeyError",
    "KVStoreError",
    "PermissionDeniedError",
    "RegistrationError",
    "ResourceExhaustedError",
    "RetryableError",
    "SessionLostError",
    "TransportError",
    "TransportTimeoutError",
    "UnavailableError",
    "WrongNodeError",
]
