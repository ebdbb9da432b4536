"""gRPC channels from this daemon to the other members of its cluster.

Rebalancing, the namespace and token table's sync, and peer health checks all
dial through here, with this daemon's TLS settings and the peer credential on
every call (``--auth token``), so daemon-to-daemon traffic is held to the same
rules as a client's.
"""

from __future__ import annotations

import grpc

from kvstore._proto.v1 import admin_pb2_grpc, cluster_pb2_grpc, data_pb2_grpc
from kvstore.protocol import metadata


class _Credential(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the peer credential to every call's metadata."""

    def __init__(self, credential: str) -> None:
        self.entry = metadata.bearer(credential)

    async def intercept_unary_unary(self, continuation, details, request):
        details = details._replace(metadata=tuple(details.metadata or ()) + (self.entry,))
        return await continuation(details, request)


class Peers:
    """Channels to the other daemons, by address."""

    def __init__(
        self, max_message: int, *, credential: str = "", tls: grpc.ChannelCredentials | None = None
    ) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._options = metadata.channel_options(max_message)
        self._interceptors = [_Credential(credential)] if credential else None
        self._tls = tls

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self._tls is not None:
                channel = grpc.aio.secure_channel(address, self._tls, options=self._options, interceptors=self._interceptors)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options, interceptors=self._interceptors)
            self._channels[address] = channel
        return channel

    def data(self, address: str) -> data_pb2_grpc.DataStub:
        return data_pb2_grpc.DataStub(self._channel(address))

    def cluster(self, address: str) -> cluster_pb2_grpc.ClusterStub:
        return cluster_pb2_grpc.ClusterStub(self._channel(address))

    def admin(self, address: str) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self._channel(address))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
