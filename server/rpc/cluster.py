"""The Cluster service: the cluster map and the Hello handshake.

A lone daemon is a cluster of one; multi-node membership plugs in behind
``cluster_map``. Hello is where a client and a daemon exchange data-plane
(UCX worker) addresses and the limits the client must batch within.
"""

from __future__ import annotations

from kvstore import __version__
from kvstore._proto.v1 import cluster_pb2 as pb
from kvstore.namespace import MAX_KEY_BYTES
from kvstore.server.config import ServerConfig
from kvstore.server.dataplane import DataPlane
from kvstore.server.metrics import Metrics
from kvstore.server.rpc.handlers import service


class ClusterService:
    def __init__(self, config: ServerConfig, metrics: Metrics, advertise: str, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.config = config
        self.metrics = metrics
        self.advertise = advertise
        self.epoch = 1

    def handler(self):
        return service(
            "Cluster",
            {
                "GetClusterMap": (pb.GetClusterMapRequest, self.get_cluster_map),
                "Hello": (pb.HelloRequest, self.hello),
            },
            self.metrics,
        )

    def cluster_map(self) -> pb.ClusterMap:
        node = pb.Node(node_id=self.config.node_id, address=self.advertise, weight=float(self.config.memory))
        return pb.ClusterMap(epoch=self.epoch, nodes=[node], replicas=1, write_quorum=1)

    async def get_cluster_map(self, request, context) -> pb.ClusterMap:
        return self.cluster_map()

    async def hello(self, request: pb.HelloRequest, context) -> pb.HelloResponse:
        connected = False
        if request.worker_address and self.dataplane.enabled:
            self.dataplane.hello(request.client_id, request.worker_address)
            connected = True
        return pb.HelloResponse(
            node_id=self.config.node_id,
            data_plane=connected,
            ucx_tls=self.dataplane.tls,
            cluster_map=self.cluster_map(),
            max_value_bytes=self.config.max_value_size,
            max_message_bytes=self.config.max_message_bytes,
            max_key_bytes=MAX_KEY_BYTES,
            server_version=__version__,
        )
