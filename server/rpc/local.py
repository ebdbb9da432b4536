"""The local channel, daemon side: the Data service over a Unix socket for
clients on this host (wire format: ``kvstore.protocol.local_channel``).

Every request runs through the same ``Method.run`` as over gRPC (strict
parsing, error mapping, metrics), with a context that carries the client's
epoch. The socket lives in the Linux abstract namespace, so it vanishes with
the daemon; it is announced in HelloResponse.local_socket. Anyone on the host
who may connect to the gRPC port may connect here: nothing is weakened, and
SO_PEERCRED tells the log which process connected.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import socket
import struct

import grpc

from kvstore import errors
from kvstore.protocol import metadata
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.local_channel import (
    AUTHORIZE,
    CONNECTION_ID,
    JOIN_BELOW,
    NO_EPOCH,
    PREAMBLE,
    REQUEST,
    payload_length,
    response_header,
    socket_address,
)
from kvstore.protocol.status import detail_of, status_of
from kvstore.server.rpc.handlers import Method, serialize

log = logging.getLogger("kvstore.server.rpc")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Calls one connection may have in flight; past it the daemon stops reading that
# socket until some finish (as gRPC bounds a connection's concurrent streams),
# so no client can pile up unbounded work.
MAX_IN_FLIGHT = 256


def socket_name(node_id: str) -> str:
    """A name no other daemon on this host uses (abstract names are at most 107 bytes)."""
    return f"kvstore/{node_id[:48]}/{os.getpid()}/{secrets.token_hex(4)}"


class LocalContext:
    """What handlers use of a gRPC ServicerContext: the request metadata (the
    routed epoch), and the process on the other end of the socket (``peer_pid``,
    from SO_PEERCRED; None when unknown). The daemon's epoch travels in the
    response frame instead of trailing metadata."""

    __slots__ = ("_metadata", "peer_pid", "_peer")

    def __init__(self, epoch: int, peer_pid: int | None = None, credential: tuple = (), peer: str = "local") -> None:
        self._metadata = (((metadata.EPOCH, str(epoch)),) if epoch != NO_EPOCH else ()) + credential
        self.peer_pid = peer_pid
        self._peer = peer

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        """Names the connection, as gRPC's context.peer() does."""
        return self._peer


class LocalServer:
    """Listens on the abstract socket ``name`` and serves ``methods`` there."""

    def __init__(self, name: str, methods: dict[str, Method], max_message: int) -> None:
        self.name = name
        self.methods = methods
        self.max_message = max_message  # the largest request payload, as gRPC's receive limit
        self.connections: set[_Connection] = set()
        self.draining = False
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(socket_address(self.name))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._server = await asyncio.get_running_loop().create_unix_server(lambda: _Connection(self), sock=sock)

    async def stop(self, grace: float) -> None:
        """Like grpc's stop(grace): no new connections or calls, in-flight calls
        get up to ``grace`` seconds, then whatever is left is cancelled."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        tasks = [task for conn in self.connections for task in conn.tasks.values()]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        leftover = [task for conn in self.connections for task in conn.tasks.values() if not task.done()]
        for conn in list(self.connections):
            conn.close()
        for task in leftover:
            task.cancel()
        # Cancelled calls unwind before the daemon closes the store under them.
        await asyncio.gather(*leftover, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


class _Connection(asyncio.Protocol):
    """One client socket: frames in, one task per request, frames out in any order."""

    def __init__(self, server: LocalServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.tasks: dict[int, asyncio.Task] = {}
        self.peer = "pid ?"
        self.peer_pid: int | None = None
        # The connection's credential (an AUTHORIZE frame), as gRPC metadata: checked on every call.
        self.credential: tuple = ()
        self.name = f"local:{id(self):x}"  # the connection, for per-connection bounds
        self._buffer = bytearray()
        self._greeted = False
        self._closed = False
        # Reading stops while either holds: replies backed up, or too many calls in flight.
        self._writes_paused = False
        self._calls_paused = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            self.peer = f"pid {pid} uid {uid}"
            self.peer_pid = pid
        except (OSError, struct.error):
            pass
        if self.server.draining:
            transport.close()
            return
        self.server.connections.add(self)
        log.info("local channel: client %s connected", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        # The client went away (or we closed): nobody reads the answers of its calls.
        self._closed = True
        self.server.connections.discard(self)
        tasks, self.tasks = self.tasks, {}
        for task in tasks.values():
            task.cancel()
        self._buffer = bytearray()
        log.debug("local channel: client %s disconnected (%d calls cancelled)", self.peer, len(tasks))

    def pause_writing(self) -> None:
        # A client that does not read its answers gets no more requests served.
        self._writes_paused = True
        self._read_if_allowed()

    def resume_writing(self) -> None:
        self._writes_paused = False
        self._read_if_allowed()

    def _read_if_allowed(self) -> None:
        if self._closed or self.transport is None or self.transport.is_closing():
            return
        if self._writes_paused or self._calls_paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._buffer += data
        self._process()

    def _process(self) -> None:
        """Dispatch every whole request in the buffer, unless too many are in flight
        (the rest wait there until calls finish)."""
        buffer = self._buffer
        position = 0
        if not self._greeted:
            if len(buffer) < len(PREAMBLE):
                if not PREAMBLE.startswith(bytes(buffer)):
                    self._fail(errors.InvalidArgumentError("not a kvstore local-channel client (bad preamble)"))
                return
            if buffer[: len(PREAMBLE)] != PREAMBLE:
                self._fail(errors.InvalidArgumentError("not a kvstore local-channel client (bad preamble)"))
                return
            self._greeted = True
            position = len(PREAMBLE)
        size = len(buffer)
        limit = self.server.max_message
        while size - position >= REQUEST.size and not self._calls_paused:
            length, request_id, epoch, timeout, name_length = REQUEST.unpack_from(buffer, position)
            payload_bytes = payload_length(length, name_length)
            if payload_bytes < 0:
                self._fail(errors.InvalidArgumentError(f"malformed local-channel frame (length {length})"))
                return
            if payload_bytes > limit:
                # Checked before the payload arrives: it is never buffered.
                error = errors.ResourceExhaustedError(
                    f"a request of {payload_bytes} bytes exceeds the daemon's message limit of {limit} bytes"
                )
                self._fail(error, request_id)
                return
            end = position + 4 + length
            if size < end:
                break
            start = position + REQUEST.size
            with memoryview(buffer) as view:  # one copy of the payload, not two
                method = bytes(view[start : start + name_length])
                payload = bytes(view[start + name_length : end])
            position = end
            if not self._dispatch(request_id, method, epoch, timeout, payload):
                return
        if position:
            del buffer[:position]

    def _dispatch(self, request_id: int, method: bytes, epoch: int, timeout: float, payload: bytes) -> bool:
        if not method:  # the client gave up on a call
            task = self.tasks.pop(request_id, None)
            if task is not None:
                task.cancel()
            return True
        if request_id == CONNECTION_ID or request_id in self.tasks:
            self._fail(errors.InvalidArgumentError(f"request id {request_id} is reserved or already in flight"))
            return False
        if method == AUTHORIZE:
            # Checked with each call that follows, as gRPC checks each call's metadata.
            self.credential = ((metadata.AUTHORIZATION, payload.decode("utf-8", "replace")),)
            self._send(response_header(request_id, 0, NO_EPOCH, 0))
            return True
        handler = self.server.methods.get(method.decode("utf-8", "replace"))
        if handler is None:
            error = errors.InternalError(f"method {method!r} is not served on the local channel")
            self._error(request_id, grpc.StatusCode.UNIMPLEMENTED, error)
        elif self.server.draining:
            self._error(request_id, grpc.StatusCode.UNAVAILABLE, errors.UnavailableError("the daemon is shutting down", code=ErrorCode.SHUTTING_DOWN))
        else:
            task = asyncio.get_running_loop().create_task(self._run(request_id, handler, payload, epoch, timeout))
            self.tasks[request_id] = task
            task.add_done_callback(functools.partial(self._finished, request_id))
            if len(self.tasks) >= MAX_IN_FLIGHT and not self._calls_paused:
                self._calls_paused = True
                self._read_if_allowed()
        return True

    def _finished(self, request_id: int, task: asyncio.Task) -> None:
        if self.tasks.get(request_id) is task:
            del self.tasks[request_id]
        if self._calls_paused and len(self.tasks) < MAX_IN_FLIGHT // 2 and not self._closed:
            self._calls_paused = False
            self._process()  # requests that arrived meanwhile
            self._read_if_allowed()

    async def _run(self, request_id: int, method: Method, payload: bytes, epoch: int, timeout: float) -> None:
        context = LocalContext(epoch, self.peer_pid, self.credential, self.name)
        try:
            if timeout > 0:
                async with asyncio.timeout(timeout):
                    response, code, error = await method.run(payload, context)
            else:
                response, code, error = await method.run(payload, context)
        except TimeoutError:
            return  # past the client's deadline: it stopped waiting
        if error is not None:
            self._error(request_id, code, error)
            return
        daemon_epoch = method.epoch() if method.epoch is not None else NO_EPOCH
        body = serialize(response)
        head = response_header(request_id, 0, daemon_epoch, len(body))
        if len(body) < JOIN_BELOW:
            self._send(head + body)
        else:
            self._send(head, body)

    def _error(self, request_id: int, code: grpc.StatusCode, error: errors.KVStoreError) -> None:
        detail = detail_of(error)  # the ErrorDetail gRPC would send
        self._send(response_header(request_id, code.value[0], NO_EPOCH, len(detail)) + detail)

    def _send(self, *parts: bytes) -> None:
        if self._closed or self.transport.is_closing():
            return  # the client is gone: drop the answer
        for part in parts:
            self.transport.write(part)

    def _fail(self, error: errors.KVStoreError, request_id: int = CONNECTION_ID) -> None:
        """A protocol violation: say why (to the offending request, or to the
        connection as request id 0), then close the connection."""
        log.warning("local channel: closing the connection of client %s: %s", self.peer, error.message)
        self._error(request_id, status_of(error), error)
        self.close()
