"""The one seam every RPC passes through.

Requests arrive as raw bytes and are parsed here, so a malformed message or one
with fields this daemon does not know gets INVALID_ARGUMENT naming the problem
(rather than gRPC's generic INTERNAL), every KVStoreError becomes its status
with an ErrorDetail, an unexpected exception becomes INTERNAL without taking the
daemon down, and every call is counted in the metrics. ``Method.run`` is that seam; gRPC
and the local channel (``local.py``) are two ways into it.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from kvstore import errors
from kvstore.protocol import metadata
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.status import status_of, trailing_metadata
from kvstore.server.admission import Admission
from kvstore.server.auth.guard import CALLER, Guard
from kvstore.server.metrics import Metrics

log = logging.getLogger("kvstore.server.rpc")

MAX_ERROR_MESSAGE = 1024

Handler = Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]


def parse_strict(request_type: type[Message], raw: bytes) -> Message:
    request = request_type()
    try:
        request.ParseFromString(raw)
    except DecodeError as exc:
        raise errors.InvalidArgumentError(
            f"malformed {request_type.DESCRIPTOR.name}: {exc}", code=ErrorCode.MALFORMED_REQUEST
        ) from None
    if has_unknown_fields(request):
        raise errors.InvalidArgumentError(
            f"{request_type.DESCRIPTOR.name} carries fields unknown to this daemon "
            f"(kvstore.v1 {request_type.DESCRIPTOR.full_name}); upgrade the daemon or drop them",
            code=ErrorCode.UNKNOWN_FIELD,
        )
    return request


def has_unknown_fields(message: Message) -> bool:
    """Whether ``message`` or any message inside it carries fields not in its schema.

    (``ByteSize`` would tell too, but upb computes it by serialising, which
    costs a full copy of every inline value.)"""
    if len(UnknownFieldSet(message)):
        return True
    for field in _message_fields(message.DESCRIPTOR):
        if field.is_repeated:
            if any(has_unknown_fields(item) for item in getattr(message, field.name)):
                return True
        elif message.HasField(field.name) and has_unknown_fields(getattr(message, field.name)):
            return True
    return False


@functools.cache
def _message_fields(descriptor) -> tuple:
    """The message-typed fields of a message type: only they can hide unknown fields
    deeper down (a batch's 32 blocks have none, so they are not walked field by field)."""
    return tuple(f for f in descriptor.fields if f.type == f.TYPE_MESSAGE)


class Method:
    """One RPC method: strict parsing, the handler, error mapping and metrics.

    ``run`` is shared by the gRPC wrapper below and the local channel
    (``kvstore.server.rpc.local``), so both transports answer a request the same way."""

    def __init__(self, label: str, request_type: type[Message], handler: Handler, metrics: Metrics, epoch) -> None:
        self.label = label
        self.request_type = request_type
        self.handler = handler
        self.epoch = epoch  # callable giving the cluster map epoch, or None (not a Data method)
        self.guard: Guard | None = None  # None or open: no credential is checked
        self.admission: Admission | None = None  # Data methods: per-tenant request bounds and rates
        self.rate_of: Callable[[Message], tuple[float, int]] = lambda ns: (0.0, 0)
        self._metrics = metrics
        self._requests = metrics.requests
        self._latency = metrics.latency.labels(label)

    async def run(self, raw: bytes, context) -> tuple[Message | bytes | None, grpc.StatusCode, errors.KVStoreError | None]:
        """(response, OK, None) or (None, status, error): a failure never escapes as an exception."""
        self._metrics.requests_in_flight += 1
        try:
            return await self._serve(raw, context)
        finally:
            self._metrics.requests_in_flight -= 1

    async def _serve(self, raw: bytes, context) -> tuple[Message | bytes | None, grpc.StatusCode, errors.KVStoreError | None]:
        started = time.perf_counter()
        guard = self.guard
        try:
            if guard is None or guard.open:
                request = parse_strict(self.request_type, raw)
            else:
                # Who is asking comes first: a caller without a valid credential learns nothing, not even
                # whether its request parses; what it asks for is checked once the request is read.
                principal = await guard.authenticate(self.label, context.invocation_metadata())
                request = parse_strict(self.request_type, raw)
                guard.authorize(self.label, principal, request)
                CALLER.set(principal)
            if self.admission is None:
                response = await self.handler(request, context)
            else:
                response = await self._admitted(request, context)
        except errors.KVStoreError as exc:
            if len(exc.message) > MAX_ERROR_MESSAGE:  # metadata beyond ~16 KiB breaks the reply
                exc.message = exc.message[:MAX_ERROR_MESSAGE] + "..."
            code = status_of(exc)
            self._requests.labels(self.label, code.name).inc()
            return None, code, _detached(exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("unexpected failure in %s", self.label)
            self._requests.labels(self.label, "INTERNAL").inc()
            error = errors.InternalError(f"{self.label} failed inside the daemon: {type(exc).__name__}: {exc}")
            return None, grpc.StatusCode.INTERNAL, _detached(error)
        self._requests.labels(self.label, "OK").inc()
        self._latency.observe(time.perf_counter() - started)
        return response, grpc.StatusCode.OK, None

    async def _admitted(self, request: Message, context) -> Message:
        ns = request.namespace
        self.admission.admit(ns.tenant, ns.subtenant, *self.rate_of(ns))
        try:
            return await self.handler(request, context)
        finally:
            self.admission.done(ns.tenant)

    async def grpc_call(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        response, code, error = await self.run(raw, context)
        if error is not None:
            context.set_trailing_metadata(trailing_metadata(error))
            await context.abort(code, error.message)
        if self.epoch is not None:
            # The epoch of this daemon's cluster map: a client routing with another map learns to refresh it.
            context.set_trailing_metadata(((metadata.EPOCH, str(self.epoch())),))
        return response


def _detached(error: errors.KVStoreError) -> errors.KVStoreError:
    """The error without its traceback and chained exceptions: their frames hold
    the handler's locals (views of the arena among them), which must not live
    as long as whoever keeps the error (gRPC keeps an aborted call's around)."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


class Service(grpc.GenericRpcHandler):
    """The generic gRPC handler of ``kvstore.v1.<name>``; ``methods`` by method name."""

    def __init__(
        self,
        name: str,
        methods: dict[str, tuple[type[Message], Handler]],
        metrics: Metrics,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        self.methods = {
            method: Method(f"{name}.{method}", request_type, handler, metrics, epoch)
            for method, (request_type, handler) in methods.items()
        }
        self._generic = grpc.method_handlers_generic_handler(
            f"kvstore.v1.{name}",
            {
                method: grpc.unary_unary_rpc_method_handler(
                    m.grpc_call, request_deserializer=None, response_serializer=serialize
                )
                for method, m in self.methods.items()
            },
        )

    def protect(self, guard: Guard) -> "Service":
        """Check every call's credential with ``guard`` (both transports)."""
        for method in self.methods.values():
            method.guard = guard
        return self

    def admit(self, admission: Admission, rate_of: Callable[[Message], tuple[float, int]]) -> "Service":
        """Bound every call by ``admission`` (requests per tenant, the namespace's ``rate_of``)."""
        for method in self.methods.values():
            method.admission = admission
            method.rate_of = rate_of
        return self

    def service_name(self) -> str:
        return self._generic.service_name()

    def service(self, handler_call_details):
        return self._generic.service(handler_call_details)


def service(
    name: str,
    methods: dict[str, tuple[type[Message], Handler]],
    metrics: Metrics,
    epoch: Callable[[], int] | None = None,
) -> Service:
    """A generic handler for ``kvstore.v1.<name>`` whose methods parse strictly."""
    return Service(name, methods, metrics, epoch)


def serialize(message: Message | bytes) -> bytes:
    # Handlers with large responses serialise them off the event loop themselves.
    return message if isinstance(message, bytes) else message.SerializeToString()
