"""The local channel's framing: Data calls to a daemon on this host over a Unix socket.

A co-located client (one that shares memory with its daemon) sends the same
protobuf requests of the Data service as over gRPC, but in a few bytes of
framing on a Unix domain socket: a round trip costs a fraction of a grpc.aio
unary call. The daemon names the socket (Linux abstract namespace, so nothing
to clean up on disk) in its HelloResponse; a client that cannot connect to it
(another host, another network namespace) keeps using gRPC. The client side is
``kvstore.client.local``, the daemon side ``kvstore.server.rpc.local``; both
build and read frames with the functions below.

Wire format. The client opens with ``PREAMBLE``; then both directions carry
frames whose integers are big-endian and whose first field, ``length``,
counts the bytes that follow it::

    request:  u32 length | u32 request id | u64 epoch | f64 timeout | u8 n | method (n bytes) | payload
    response: u32 length | u32 request id | u8 status | u64 epoch | payload

- request id: chosen by the client, unique among its calls in flight (several
  calls share one socket; responses come back in any order). Id 0 is reserved
  for a response about the connection itself (a bad preamble, a frame over the
  size limit): the daemon closes the connection after sending it.
- epoch: in a request, the cluster map epoch the client routed with (what the
  ``kvstore-epoch`` metadata carries over gRPC); in a successful response, the
  daemon's epoch (the trailing ``kvstore-epoch``); all ones (2**64-1) for none.
- timeout: seconds the client waits for the answer (0 = none); the daemon
  cancels the call once it has passed, as gRPC does at a deadline.
- method: the Data method's name ("Put", "Get", "Exists" ...); an empty name
  with an empty payload cancels the call with that request id (no answer).
- method ``@authorization`` (``AUTHORIZE``): the payload is the connection's
  credential, as gRPC's ``authorization`` metadata value ("Bearer <token>");
  answered OK with an empty payload, and checked with every call that follows
  on the connection (a wrong one fails those calls, as over gRPC).
- status: the gRPC status code's number; 0 (OK) with the serialized response
  as payload, anything else with a serialized ``kvstore.v1.ErrorDetail``.

The daemon rejects a request whose payload exceeds its gRPC message limit
(RESOURCE_EXHAUSTED on request id 0, then it closes the connection).
"""

from __future__ import annotations

import struct

PREAMBLE = b"KVSTORE-LOCAL/1\n"
REQUEST = struct.Struct("!IIQdB")  # length, request id, epoch, timeout, method name length
RESPONSE = struct.Struct("!IIBQ")  # length, request id, status, epoch
CONNECTION_ID = 0
AUTHORIZE = b"@authorization"
NO_EPOCH = (1 << 64) - 1
# Frames below this size go out in one write (one syscall); larger payloads are
# written after their header rather than copied to prepend a few bytes.
JOIN_BELOW = 64 << 10


def socket_address(name: str) -> str:
    """The abstract-namespace address of a socket name (a leading NUL byte)."""
    return "\0" + name


def request_header(request_id: int, epoch: int, timeout: float, method: bytes, payload_length: int) -> bytes:
    """A request frame up to its payload: the fixed fields and the method name."""
    return REQUEST.pack(REQUEST.size - 4 + len(method) + payload_length, request_id, epoch, timeout, len(method)) + method


def cancel_frame(request_id: int) -> bytes:
    """The request that cancels call ``request_id`` (an empty method and payload)."""
    return REQUEST.pack(REQUEST.size - 4, request_id, NO_EPOCH, 0.0, 0)


def payload_length(length: int, method_length: int) -> int:
    """The payload bytes of a request frame whose length field says ``length`` (negative: malformed)."""
    return length - (REQUEST.size - 4) - method_length


def response_header(request_id: int, status: int, epoch: int, body_length: int) -> bytes:
    return RESPONSE.pack(RESPONSE.size - 4 + body_length, request_id, status, epoch)
