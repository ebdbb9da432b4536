"""The Admin service: namespaces (list, drop, replication policy) and
daemon-wide statistics, cluster view and rebalancing progress included."""

from __future__ import annotations

import time

from kvstore import __version__
from kvstore._proto.v1 import admin_pb2 as pb
from kvstore._proto.v1 import cluster_pb2
from kvstore.namespace import validate_name
from kvstore.protocol.convert import namespace_of, namespace_to_proto, policy_to_proto
from kvstore.server.cluster.membership import Membership
from kvstore.server.cluster.state import ClusterState
from kvstore.server.config import ServerConfig
from kvstore.server.dataplane import DataPlane
from kvstore.server.metrics import Metrics
from kvstore.server.rpc.handlers import service
from kvstore.server.storage.store import BlockStore


class AdminService:
    def __init__(
        self,
        store: BlockStore,
        config: ServerConfig,
        metrics: Metrics,
        dataplane: DataPlane,
        cluster: ClusterState,
        membership: Membership,
        rebalance_status=lambda: pb.RebalanceStatus(state="idle"),
    ) -> None:
        self.dataplane = dataplane
        self.store = store
        self.config = config
        self.metrics = metrics
        self.cluster = cluster
        self.membership = membership
        self.rebalance_status = rebalance_status
        self.started = time.monotonic()

    def handler(self):
        return service(
            "Admin",
            {
                "ListNamespaces": (pb.ListNamespacesRequest, self.list_namespaces),
                "DropNamespace": (pb.DropNamespaceRequest, self.drop_namespace),
                "ServerStats": (pb.ServerStatsRequest, self.server_stats),
                "SetNamespacePolicy": (pb.SetNamespacePolicyRequest, self.set_namespace_policy),
                "GetNamespacePolicy": (pb.GetNamespacePolicyRequest, self.get_namespace_policy),
            },
            self.metrics,
        )

    async def list_namespaces(self, request: pb.ListNamespacesRequest, context) -> pb.ListNamespacesResponse:
        if request.tenant:
            validate_name("tenant", request.tenant)
        response = pb.ListNamespacesResponse()
        for ns in self.store.namespaces():
            if request.tenant and ns.tenant != request.tenant:
                continue
            counters = self.store.namespace_counters(ns)
            response.namespaces.add(
                namespace=namespace_to_proto(ns),
                blocks=counters.blocks,
                bytes=counters.bytes,
            )
        return response

    async def drop_namespace(self, request: pb.DropNamespaceRequest, context) -> pb.DropNamespaceResponse:
        ns = namespace_of(request)
        counters = await self.store.drop_namespace(ns)
        return pb.DropNamespaceResponse(blocks=counters.blocks, bytes=counters.bytes)

    async def set_namespace_policy(self, request: pb.SetNamespacePolicyRequest, context) -> cluster_pb2.NamespacePolicy:
        policy = request.policy
        ns = namespace_of(policy)
        applied = self.cluster.set_policy(ns, policy.replicas, policy.write_quorum)
        if hasattr(self.membership, "put_policy"):  # etcd: every daemon learns it through its watch
            if policy.replicas == 0:
                await self.membership.delete_policy(ns.tenant, ns.subtenant)
            else:
                await self.membership.put_policy(
                    ns.tenant, ns.subtenant, {"replicas": applied.replicas, "write_quorum": applied.write_quorum}
                )
        return policy_to_proto(ns, applied)

    async def get_namespace_policy(self, request: pb.GetNamespacePolicyRequest, context) -> cluster_pb2.NamespacePolicy:
        ns = namespace_of(request)
        return policy_to_proto(ns, self.cluster.replication(ns))

    async def server_stats(self, request, context) -> pb.ServerStatsResponse:
        stats = self.store.stats()
        memory, disk = stats.memory, stats.disk
        total_requests = sum(
            sample.value
            for metric in self.metrics.requests.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
        return pb.ServerStatsResponse(
            node_id=self.config.node_id,
            address=self.cluster.advertise,
            data_dir=stats.data_dir,
            version=__version__,
            uptime_seconds=time.monotonic() - self.started,
            tiers=[
                pb.TierStats(
                    name="memory", blocks=memory.blocks, bytes=memory.bytes, capacity_bytes=memory.capacity_bytes,
                    resident_bytes=memory.resident_bytes,
                ),
                pb.TierStats(name="disk", blocks=disk.blocks, bytes=disk.bytes, capacity_bytes=disk.capacity_bytes),
            ],
            namespaces=stats.namespaces,
            corrupt_blocks=stats.corrupt_blocks,
            evictions=stats.evictions,
            requests=int(total_requests),
            data_plane=self.dataplane.enabled,
            ucx_tls=self.dataplane.tls if self.dataplane.enabled else "",
            data_plane_clients=len(self.dataplane.sessions),
            arena_used_bytes=stats.arena_used_bytes,
            cluster_epoch=self.cluster.epoch,
            cluster_nodes=len(self.cluster.members.members),
            membership=self.membership.status().get("kind", ""),
            rebalance=self.rebalance_status(),
        )
