"""The one seam every RPC passes through.

Requests arrive as raw bytes and are parsed here, so a malformed message or one
with fields this daemon does not know gets INVALID_ARGUMENT naming the problem
(rather than gRPC's generic INTERNAL), every KVStoreError becomes its status
with an ErrorDetail, an unexpected exception becomes INTERNAL without taking the
daemon down, and every call is counted in the metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from kvstore import errors
from kvstore.server.metrics import Metrics
from kvstore.server.rpc.status import status_of, trailing_metadata

log = logging.getLogger("kvstore.server.rpc")

MAX_ERROR_MESSAGE = 1024

Handler = Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]


def parse_strict(request_type: type[Message], raw: bytes) -> Message:
    request = request_type()
    try:
        request.ParseFromString(raw)
    except DecodeError as exc:
        raise errors.InvalidArgumentError(
            f"malformed {request_type.DESCRIPTOR.name}: {exc}", code="MALFORMED_REQUEST"
        ) from None
    if has_unknown_fields(request):
        raise errors.InvalidArgumentError(
            f"{request_type.DESCRIPTOR.name} carries fields unknown to this daemon "
            f"(kvstore.v1 {request_type.DESCRIPTOR.full_name}); upgrade the daemon or drop them",
            code="UNKNOWN_FIELD",
        )
    return request


def has_unknown_fields(message: Message) -> bool:
    """Whether ``message`` or any message inside it carries fields not in its schema.

    (``ByteSize`` would tell too, but upb computes it by serialising, which
    costs a full copy of every inline value.)"""
    if len(UnknownFieldSet(message)):
        return True
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.is_repeated:
            if any(has_unknown_fields(item) for item in value):
                return True
        elif has_unknown_fields(value):
            return True
    return False


# Trailing metadata of every successful Data call: the epoch of this daemon's
# cluster map, so a client routing with another map learns to refresh it.
EPOCH_METADATA = "kvstore-epoch"


def service(
    name: str,
    methods: dict[str, tuple[type[Message], Handler]],
    metrics: Metrics,
    epoch: Callable[[], int] | None = None,
):
    """A generic handler for ``kvstore.v1.<name>`` whose methods parse strictly."""
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            _wrap(f"{name}.{method}", request_type, handler, metrics, epoch),
            request_deserializer=None,
            response_serializer=_serialize,
        )
        for method, (request_type, handler) in methods.items()
    }
    return grpc.method_handlers_generic_handler(f"kvstore.v1.{name}", handlers)


def _serialize(message: Message | bytes) -> bytes:
    # Handlers with large responses serialise them off the event loop themselves.
    return message if isinstance(message, bytes) else message.SerializeToString()


def _wrap(label: str, request_type: type[Message], handler: Handler, metrics: Metrics, epoch):
    requests = metrics.requests
    latency = metrics.latency.labels(label)

    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        started = time.perf_counter()
        try:
            request = parse_strict(request_type, raw)
            response = await handler(request, context)
        except errors.KVStoreError as exc:
            if len(exc.message) > MAX_ERROR_MESSAGE:  # metadata beyond ~16 KiB breaks the reply
                exc.message = exc.message[:MAX_ERROR_MESSAGE] + "..."
            code = status_of(exc)
            requests.labels(label, code.name).inc()
            context.set_trailing_metadata(trailing_metadata(exc))
            await context.abort(code, exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("unexpected failure in %s", label)
            requests.labels(label, "INTERNAL").inc()
            error = errors.InternalError(f"{label} failed inside the daemon: {type(exc).__name__}: {exc}")
            context.set_trailing_metadata(trailing_metadata(error))
            await context.abort(grpc.StatusCode.INTERNAL, error.message)
        requests.labels(label, "OK").inc()
        latency.observe(time.perf_counter() - started)
        if epoch is not None:
            context.set_trailing_metadata(((EPOCH_METADATA, str(epoch())),))
        return response

    return call
