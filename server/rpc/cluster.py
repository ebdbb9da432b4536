"""The Cluster service: the cluster map and the Hello handshake.

The map comes from ``ClusterState`` (static peers or etcd). Hello is where a client and a daemon exchange data-plane
(UCX worker) addresses and the limits the client must batch within.
"""

from __future__ import annotations

from kvstore import __version__
from kvstore._proto.v1 import cluster_pb2 as pb
from kvstore.namespace import MAX_KEY_BYTES, Namespace
from kvstore.server.auth.guard import caller
from kvstore.server.cluster.state import ClusterState
from kvstore.server.config import ServerConfig
from kvstore.server.dataplane import DataPlane
from kvstore.server.metrics import Metrics
from kvstore.server.rpc.handlers import service


class ClusterService:
    def __init__(
        self, config: ServerConfig, metrics: Metrics, cluster: ClusterState, dataplane: DataPlane, local_socket: str = ""
    ) -> None:
        self.dataplane = dataplane
        self.local_socket = local_socket  # the local channel's name, "" when there is none
        self.config = config
        self.metrics = metrics
        self.cluster = cluster

    def handler(self):
        return service(
            "Cluster",
            {
                "GetClusterMap": (pb.GetClusterMapRequest, self.get_cluster_map),
                "Hello": (pb.HelloRequest, self.hello),
            },
            self.metrics,
        )

    async def get_cluster_map(self, request, context) -> pb.ClusterMap:
        return self._map()

    def _map(self) -> pb.ClusterMap:
        """The cluster map, with only the namespace policies the caller may know of."""
        cluster_map = self.cluster.to_proto()
        who = caller()
        if not who.sees_everything:
            mine = [p for p in cluster_map.policies if who.covers(Namespace(p.namespace.tenant, p.namespace.subtenant))]
            del cluster_map.policies[:]
            cluster_map.policies.extend(mine)
        return cluster_map

    async def hello(self, request: pb.HelloRequest, context) -> pb.HelloResponse:
        session = b""
        if request.worker_address and self.dataplane.enabled:
            session = await self.dataplane.hello(
                request.client_id, request.worker_address, request.previous_session, owner=caller().key,
                source=peer_host(context),
            )
        return pb.HelloResponse(
            session=session,
            node_id=self.config.node_id,
            data_plane=bool(session),
            ucx_tls=self.dataplane.tls,
            cluster_map=self._map(),
            max_value_bytes=self.config.max_value_size,
            max_message_bytes=self.config.max_message_bytes,
            max_key_bytes=MAX_KEY_BYTES,
            server_version=__version__,
            local_socket=self.local_socket if self.dataplane.enabled else "",
            process_copy=bool(session) and bool(self.local_socket) and self.dataplane.process_copy,
        )


def peer_host(context) -> str:
    """The host part of the caller's address ("ipv4:10.0.0.5:41234" -> "ipv4:10.0.0.5")."""
    peer = context.peer() if hasattr(context, "peer") else ""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
