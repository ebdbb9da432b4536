"""The client's connections to daemons, by address: the handshake, the
zero-copy data plane it brings up, and one RPC to one daemon.

``Hello`` introduces the client and its UCX worker to a daemon, which then
opens its data-plane endpoint to it; the first daemon's answer also gives the
limits this client works within (largest value, largest message). A daemon
that lost our data-plane session (it restarted, or a transfer failed) is
greeted again once and the call resent.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc

from kvstore import errors
from kvstore._proto.v1 import cluster_pb2
from kvstore.client.config import ClientConfig
from kvstore.client.connection import Connection
from kvstore.client.regions import MemoryRegion, StagingPool, allocate_region, shared_memory_allowed
from kvstore.protocol import metadata
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.status import error_from_rpc

# The daemon lost our data-plane session: greet it again and resend.
SESSION_LOST = (ErrorCode.UNKNOWN_CLIENT, ErrorCode.TRANSFER_FAILED)
ZERO_COPY_METHODS = ("Put", "Get")


class Nodes:
    """Every daemon this client talks to, and the data plane it talks to them with."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.client_id = uuid.uuid4().hex
        self.connections: dict[str, Connection] = {}  # by address
        # Daemons that announced copying our registered memory themselves but were
        # refused by the kernel (they answered SHARED_MEMORY_UNAVAILABLE): by address.
        self.process_copy_refused: set[str] = set()
        self._hello_locks: dict[str, asyncio.Lock] = {}
        self.limits: cluster_pb2.HelloResponse | None = None  # of the first daemon that answered
        self.zero_copy = False  # True once a daemon accepted our data plane
        self.staging: StagingPool | None = None
        self._plane = None  # (native Context, Worker) once the data plane is up
        self._plane_error: str | None = None
        self._tls = config.channel_credentials()  # read once: every connection shares them
        self.closed = False

    # -- the zero-copy data plane ------------------------------------------

    def native_plane(self):
        """(Context, Worker) of the native module, or None for inline transfers."""
        if self.config.transport == "inline" or self._plane_error is not None:
            return None
        if self._plane is None:
            try:
                from kvstore import _native
            except ImportError as exc:
                _native, reason = None, f"kvstore._native is not built ({exc})"
            else:
                reason = None if _native.available() else _native.unavailable_reason() or "UCX is unavailable"
            if reason is not None:
                self._plane_error = reason
                if self.config.transport == "ucx":
                    raise errors.UnavailableError(
                        f"transport 'ucx' asked for, but {reason}", code=ErrorCode.DATA_PLANE_UNAVAILABLE
                    )
                return None
            context = _native.Context(self.config.ucx_tls or None)
            self._plane = (context, _native.Worker(context))
        return self._plane

    def register(self, buffer) -> MemoryRegion:
        plane = self.native_plane()
        handle = plane[0].register(buffer) if plane else None
        return MemoryRegion(buffer, handle)

    def register_ptr(self, address: int, length: int) -> MemoryRegion:
        plane = self.native_plane()
        handle = plane[0].register_ptr(address, length) if plane else None
        return MemoryRegion(None, handle, address=address, length=length)

    def allocate(self, nbytes: int) -> MemoryRegion:
        return allocate_region(nbytes, self.register, share=shared_memory_allowed(self.config.ucx_tls))

    def zero_copy_to(self, address: str) -> bool:
        """Whether a region's blocks may move by the data plane to the daemon at ``address``
        (yes until its Hello says it has none)."""
        conn = self.connections.get(address)
        return conn is None or conn.hello is None or conn.zero_copy

    def copies_process(self, address: str) -> bool:
        """Whether the daemon at ``address`` copies the blocks of memory this process
        registered itself (hashing them as it copies), so that a put need not send
        their checksums: it said so in its Hello and our Data calls to it go over
        its local channel."""
        conn = self.connections.get(address)
        if conn is None or conn.hello is None or not conn.hello.process_copy or address in self.process_copy_refused:
            return False
        return conn.local is not None and not conn.local.closed

    def copies_process_anywhere(self) -> bool:
        """Whether any daemon this client talks to copies this process's memory itself."""
        return any(self.copies_process(address) for address in self.connections)

    @property
    def max_value_bytes(self) -> int:
        return self.limits.max_value_bytes if self.limits else 256 << 20

    @property
    def max_batch_bytes(self) -> int:
        announced = self.limits.max_message_bytes - (1 << 20) if self.limits else self.config.max_batch_bytes
        return max(1, min(self.config.max_batch_bytes, announced))

    # -- connections ---------------------------------------------------------

    def connection(self, address: str) -> Connection:
        conn = self.connections.get(address)
        if conn is None:
            local = self.config.local_channel and shared_memory_allowed(self.config.ucx_tls)
            conn = self.connections[address] = Connection(
                address, local_channel=local, token=self.config.token, tls=self._tls, tls_server_name=self.config.tls_server_name
            )
        return conn

    async def hello(self, address: str, timeout: float, *, wait: bool) -> cluster_pb2.HelloResponse:
        """Greet a seed daemon (``wait``: patiently, while it may still be starting);
        the first that answers sets this client's limits."""
        conn = self.connection(address)
        hello = await self._handshake(conn, timeout, wait=wait)
        if self.limits is None:
            self.limits = hello
            self.zero_copy = conn.zero_copy
        return hello

    async def _handshake(
        self, conn: Connection, timeout: float, *, wait: bool = False, seen: int | None = None
    ) -> cluster_pb2.HelloResponse:
        """Hello to one daemon: it learns our worker (and opens its data-plane endpoint to it).

        ``seen`` is the handshake generation a caller found broken: if another
        caller has said Hello since, that one is used (a second Hello would
        close the session the first caller's retry is already using)."""
        lock = self._hello_locks.setdefault(conn.endpoint, asyncio.Lock())
        async with lock:
            if seen is not None and conn.generation != seen and conn.hello is not None:
                return conn.hello
            plane = self.native_plane()
            worker_address = plane[1].address if plane else b""
            hello = await conn.handshake(self.client_id, timeout, worker_address, wait=wait)
        if self.config.transport == "ucx" and not conn.zero_copy:
            raise errors.UnavailableError(
                f"transport 'ucx' asked for, but the daemon at {conn.endpoint} has no zero-copy data plane",
                code=ErrorCode.DATA_PLANE_UNAVAILABLE,
            )
        if conn.zero_copy and self.staging is None:
            self.staging = StagingPool(self.allocate(self.config.staging_bytes))
        return hello

    async def call(self, address: str, service: str, method: str, request, timeout: float, epoch: int):
        """One RPC to the daemon at ``address``, routed with map ``epoch``:
        (response, the daemon's epoch for a Data call or None); KVStoreError on failure."""
        if self.closed:
            raise errors.UnavailableError("the client is closed", code=ErrorCode.SHUTTING_DOWN)
        conn = self.connection(address)
        if conn.hello is None:
            await self._handshake(conn, timeout, seen=conn.generation)
        generation = conn.generation
        try:
            return await self._send(conn, service, method, request, timeout, epoch)
        except errors.KVStoreError as error:
            if error.code not in SESSION_LOST or self._plane is None:
                raise
        await self._handshake(conn, timeout, seen=generation)
        return await self._send(conn, service, method, request, timeout, epoch)

    async def _send(self, conn: Connection, service: str, method: str, request, timeout: float, epoch: int):
        if method in ZERO_COPY_METHODS and service == "data" and request.HasField("region"):
            # A zero-copy request names the data-plane session this daemon's Hello handed us.
            request.client_id = self.client_id
            request.session = conn.hello.session
        if service == "data":
            local = await conn.local_channel()
            if local is not None:
                return await local.call(method, request, epoch, timeout)
        pending = getattr(getattr(conn, service), method)(
            request, timeout=timeout, metadata=((metadata.EPOCH, str(epoch)),) + conn.credential
        )
        try:
            response = await pending
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, conn.endpoint) from None
        if service != "data":
            return response, None
        theirs = metadata.epoch_of(await pending.trailing_metadata())
        return response, int(theirs) if theirs is not None and theirs.isdigit() else None

    async def close(self) -> None:
        self.closed = True
        connections, self.connections = list(self.connections.values()), {}
        for conn in connections:
            await conn.close()
        if self.staging is not None:
            self.staging.close()
            self.staging = None
        if self._plane is not None:
            self._plane[1].close()
            self._plane = None
