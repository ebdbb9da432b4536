"""The local channel, client side: Data calls to a daemon on this host over
its Unix socket (the framing is ``kvstore.protocol.local_channel``).

A co-located client sends the same protobuf requests of the Data service as
over gRPC, in a few bytes of framing: a round trip costs a fraction of a
grpc.aio unary call. Any number of calls share one socket; answers come back
in any order and are matched by request id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from kvstore import errors
from kvstore._proto.v1 import data_pb2
from kvstore.protocol.local_channel import (
    AUTHORIZE,
    CONNECTION_ID,
    JOIN_BELOW,
    NO_EPOCH,
    PREAMBLE,
    RESPONSE,
    cancel_frame,
    request_header,
    socket_address,
)
from kvstore.protocol.status import BY_STATUS_NUMBER, error_from_status

log = logging.getLogger("kvstore.client")

RESPONSE_TYPES = {
    m.name: getattr(data_pb2, m.output_type.name) for m in data_pb2.DESCRIPTOR.services_by_name["Data"].methods
}


class LocalChannel(asyncio.Protocol):
    """One socket to one daemon carrying any number of concurrent Data calls."""

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint  # the daemon's gRPC address: errors name it as over gRPC
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.calls = 0  # calls the daemon answered (successes and errors), for tests and diagnostics
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._buffer = bytearray()
        self._broken: tuple | None = None  # (status, ErrorDetail bytes) the daemon closed us with

    @classmethod
    async def open(cls, name: str, endpoint: str, timeout: float, authorization: str = "") -> "LocalChannel":
        """Connect (OSError or TimeoutError when the socket is not reachable from here).

        ``authorization`` ("Bearer <token>") is sent once and holds for every call on the socket."""
        loop = asyncio.get_running_loop()
        _, channel = await asyncio.wait_for(
            loop.create_unix_connection(lambda: cls(name, endpoint), socket_address(name)), timeout
        )
        channel.transport.write(PREAMBLE)
        if authorization:
            # Its empty OK answer matches no pending call and is dropped.
            credential = authorization.encode()
            channel.transport.write(request_header(next(channel._ids), NO_EPOCH, 0.0, AUTHORIZE, len(credential)) + credential)
        return channel

    # -- calls ----------------------------------------------------------------

    async def call(self, method: str, request, epoch: int, timeout: float):
        """(response, the daemon's epoch or None); otherwise the KVStoreError the same failure gives over gRPC."""
        if self.closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        if request_id > 0xFFFFFFFF:
            self._ids = itertools.count(2)
            request_id = 1
        payload = request.SerializeToString()
        future = loop.create_future()
        self._pending[request_id] = future
        self._write(request_header(request_id, epoch, timeout, method.encode(), len(payload)), payload)
        timer = loop.call_later(timeout, self._expire, request_id, future)
        try:
            status, daemon_epoch, body = await future
        except asyncio.CancelledError:
            self._cancel(request_id)
            raise
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)
        self.calls += 1
        if status == 0:
            return RESPONSE_TYPES[method].FromString(body), None if daemon_epoch == NO_EPOCH else daemon_epoch
        raise self._error(status, body)

    def _write(self, head: bytes, payload: bytes) -> None:
        if len(payload) < JOIN_BELOW:
            self.transport.write(head + payload)
        else:  # no copy of a large payload just to prepend a few bytes
            self.transport.write(head)
            self.transport.write(payload)

    def _expire(self, request_id: int, future: asyncio.Future) -> None:
        if not future.done():
            future.set_exception(self._error(grpc.StatusCode.DEADLINE_EXCEEDED.value[0], b"", "Deadline Exceeded"))
            self._cancel(request_id)

    def _cancel(self, request_id: int) -> None:
        """Tell the daemon to stop working on a call nobody waits for any more."""
        if not self.closed and self.transport is not None:
            self.transport.write(cancel_frame(request_id))

    def _error(self, status: int, detail: bytes, details: str | None = None) -> errors.KVStoreError:
        return error_from_status(BY_STATUS_NUMBER.get(status, grpc.StatusCode.UNKNOWN), details, detail, self.endpoint)

    def _closed_error(self) -> errors.KVStoreError:
        if self._broken is not None:
            return self._error(*self._broken)
        return self._error(grpc.StatusCode.UNAVAILABLE.value[0], b"", "the local channel to the daemon closed")

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        position = 0
        size = len(buffer)
        while size - position >= RESPONSE.size:
            length, request_id, status, epoch = RESPONSE.unpack_from(buffer, position)
            end = position + 4 + length
            if size < end:
                break
            with memoryview(buffer) as view:  # one copy of the payload, not two
                body = bytes(view[position + RESPONSE.size : end])
            position = end
            if request_id == CONNECTION_ID:
                log.warning("the daemon at %s closed the local channel: %s", self.endpoint, self._error(status, body))
                self._broken = (status, body)
                self.close()
                return
            future = self._pending.get(request_id)
            if future is not None and not future.done():  # else a call that timed out: dropped
                future.set_result((status, epoch, body))
        if position:
            del buffer[:position]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self._closed_error())  # one instance each: callers remap .index

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # connection_lost fails whatever is pending
        self.closed = True
