"""gRPC channels to daemons, with the local channel beside them for Data
calls to a daemon on this host."""

from __future__ import annotations

import asyncio
import logging

import grpc

from kvstore._proto.v1 import admin_pb2_grpc, cluster_pb2, cluster_pb2_grpc, data_pb2_grpc
from kvstore.client.local import LocalChannel
from kvstore.protocol import metadata
from kvstore.protocol.status import error_from_rpc

log = logging.getLogger("kvstore.client")

class Connection:
    """One channel to one daemon with its service stubs and the limits it announced.

    With ``local_channel`` the Data calls go over the daemon's local channel
    whenever its Hello announces one that this process can reach."""

    def __init__(
        self, endpoint: str, *, local_channel: bool = False, token: str = "", tls=None, tls_server_name: str = ""
    ) -> None:
        self.endpoint = endpoint
        # Sent with every call (gRPC metadata; once per local-channel socket).
        self.credential: tuple[tuple[str, str], ...] = (metadata.bearer(token),) if token else ()
        self.local_allowed = local_channel
        self.local: LocalChannel | None = None
        self._local_name = ""  # announced by the last Hello and not tried yet
        self._local_opening: asyncio.Future | None = None
        options = metadata.channel_options()
        if tls is not None:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self.channel = grpc.aio.secure_channel(endpoint, tls, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(endpoint, options=options)
        self.data = data_pb2_grpc.DataStub(self.channel)
        self.cluster = cluster_pb2_grpc.ClusterStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.hello: cluster_pb2.HelloResponse | None = None
        # Counts successful handshakes, so that concurrent callers who saw the
        # same lost session say Hello again only once.
        self.generation = 0

    @property
    def zero_copy(self) -> bool:
        """Whether the daemon opened a data-plane endpoint to this client."""
        return bool(self.hello and self.hello.data_plane)

    async def handshake(
        self, client_id: str, timeout: float, worker_address: bytes = b"", *, wait: bool = True
    ) -> cluster_pb2.HelloResponse:
        """Introduce the client (and its data-plane worker, if any) to the daemon.

        ``wait`` keeps trying to connect until the timeout (a daemon that is
        still starting); without it an unreachable daemon fails at once."""
        from kvstore import __version__

        try:
            self.hello = await self.cluster.Hello(
                cluster_pb2.HelloRequest(
                    client_id=client_id,
                    client_version=__version__,
                    worker_address=worker_address,
                    # The session our last Hello opened there, which this one replaces.
                    previous_session=self.hello.session if self.hello is not None else b"",
                ),
                timeout=timeout,
                wait_for_ready=wait,
                metadata=self.credential,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.endpoint) from None
        self.generation += 1
        self._announce_local(self.hello.local_socket)
        return self.hello

    # -- the local channel ----------------------------------------------------

    def _announce_local(self, name: str) -> None:
        """A successful Hello: keep a working channel to the same socket, else try ``name`` next."""
        if not self.local_allowed:
            return
        local = self.local
        if local is not None and (local.closed or local.name != name):
            self.local = None
            local.close()
        self._local_name = name if self.local is None else ""

    async def local_channel(self) -> LocalChannel | None:
        """The local channel for Data calls, opened on first use; None means gRPC.

        A channel that broke is not reopened until the next Hello (the daemon
        may have restarted under another socket name)."""
        local = self.local
        if local is not None:
            if not local.closed:
                return local
            self.local = None
        if not self._local_name:
            return None
        if self._local_opening is None:
            self._local_opening = asyncio.ensure_future(self._open_local(self._local_name))
        return await asyncio.shield(self._local_opening)

    async def _open_local(self, name: str) -> LocalChannel | None:
        try:
            authorization = self.credential[0][1] if self.credential else ""
            self.local = await LocalChannel.open(name, self.endpoint, timeout=1.0, authorization=authorization)
        except (OSError, asyncio.TimeoutError) as exc:
            # Another host or network namespace: the daemon's socket is not ours to reach.
            log.debug("no local channel to %s (%s); Data calls use gRPC", self.endpoint, exc)
        finally:
            if self._local_name == name:
                self._local_name = ""
            self._local_opening = None
        return self.local

    async def close(self) -> None:
        if self._local_opening is not None:
            self._local_opening.cancel()
        if self.local is not None:
            self.local.close()
            self.local = None
        await self.channel.close()
