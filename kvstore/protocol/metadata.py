"""gRPC metadata keys and channel options of the kvstore protocol."""

from __future__ import annotations

# The cluster map epoch: in a Data request's metadata, the map the caller routed
# with; in a Data response's trailing metadata, the answering daemon's map.
EPOCH = "kvstore-epoch"
# A failed call's serialized ``kvstore.v1.ErrorDetail``, in its trailing metadata.
ERROR_DETAIL = "kvstore-error-bin"
# The caller's credential, as HTTP has it: "Bearer <token>" (a data token, the
# admin token, or the peer credential daemons derive from it).
AUTHORIZATION = "authorization"
BEARER = "Bearer "


def bearer(token: str) -> tuple[str, str]:
    """The metadata entry that presents ``token``."""
    return (AUTHORIZATION, BEARER + token)


def token_of(metadata) -> str | None:
    """The bearer token of a call's invocation metadata: None when there is none,
    "" when the entry is there but is not a bearer token."""
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            return value[len(BEARER):].strip() if isinstance(value, str) and value.startswith(BEARER) else ""
    return None


def epoch_of(metadata) -> str | None:
    """The ``kvstore-epoch`` value of a call's (trailing or invocation) metadata, or None."""
    for key, value in metadata or ():
        if key == EPOCH:
            return value
    return None


def channel_options(max_message: int = -1) -> list[tuple[str, int]]:
    """Options of a channel to a daemon (from the SDK, a peer daemon or the harness).

    ``max_message`` bounds both directions (-1: unbounded; the daemon enforces its own)."""
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        # A client reacts to failures itself (replicas, retry policy): no hidden retries.
        ("grpc.enable_retries", 0),
        # A restarted daemon must be usable again at once, not after gRPC's
        # default reconnect backoff (1 s, growing to 2 min).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
