"""The Admin service: namespaces (create, list, drop, replication policy),
data tokens (create, list, revoke) and their replication between daemons, and
daemon-wide statistics, cluster view and rebalancing progress included. Under
``--auth token`` every call here needs the admin token (``auth.guard``)."""

from __future__ import annotations

import asyncio
import time

from kvstore import __version__, errors
from kvstore._proto.v1 import admin_pb2 as pb
from kvstore._proto.v1 import cluster_pb2
from kvstore.namespace import Namespace, validate_name
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.convert import namespace_of, namespace_to_proto, policy_to_proto
from kvstore.server.auth.guard import Guard
from kvstore.server.auth.sync import from_records, to_records
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
        guard: Guard,
        rebalance_status=lambda: pb.RebalanceStatus(state="idle"),
        replicate=None,
    ) -> None:
        self.guard = guard
        # Hands the table to every reachable member; awaited before a change is acknowledged,
        # so that a token works on every daemon once its creator has it.
        self.replicate = replicate
        self.table = guard.table
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
                "CreateNamespace": (pb.CreateNamespaceRequest, self.create_namespace),
                "CreateToken": (pb.CreateTokenRequest, self.create_token),
                "ListTokens": (pb.ListTokensRequest, self.list_tokens),
                "RevokeToken": (pb.RevokeTokenRequest, self.revoke_token),
                "SyncAuth": (pb.SyncAuthRequest, self.sync_auth),
            },
            self.metrics,
        )

    async def list_namespaces(self, request: pb.ListNamespacesRequest, context) -> pb.ListNamespacesResponse:
        if request.tenant:
            validate_name("tenant", request.tenant)
        response = pb.ListNamespacesResponse()
        # Those holding blocks here, and those created and still empty.
        found = set(self.store.namespaces()) | set(self.table.namespaces())
        for ns in sorted(found, key=lambda ns: (ns.tenant, ns.subtenant)):
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
        self.table.drop_namespace(ns)  # first: no new writes under the token rules while the blocks go
        counters = await self.store.drop_namespace(ns)
        return pb.DropNamespaceResponse(blocks=counters.blocks, bytes=counters.bytes)

    # -- namespaces and tokens --------------------------------------------------

    async def _replicated(self) -> None:
        if self.replicate is not None:
            await self.replicate()

    async def create_namespace(self, request: pb.CreateNamespaceRequest, context) -> pb.CreateNamespaceResponse:
        created = self.table.create_namespace(namespace_of(request))
        await self._replicated()
        return pb.CreateNamespaceResponse(created=created)

    def _tokens_checked(self) -> None:
        if self.guard.open:
            raise errors.InvalidArgumentError(
                "this daemon runs with --auth open, where no token is checked: start it with --auth token",
                code=ErrorCode.AUTH_OPEN,
            )

    async def create_token(self, request: pb.CreateTokenRequest, context) -> pb.CreateTokenResponse:
        self._tokens_checked()
        validate_name("tenant", request.tenant)
        if request.subtenant:
            ns = Namespace(request.tenant, request.subtenant)
            if not self.table.has_namespace(ns):
                raise errors.InvalidArgumentError(
                    f"namespace {ns.tenant}/{ns.subtenant} does not exist: create it first ('kvstore ns create')",
                    code=ErrorCode.UNKNOWN_NAMESPACE,
                )
        # The KDF runs once, off the event loop.
        token_id, record, token = await asyncio.to_thread(
            self.table.create_token, request.tenant, request.subtenant, request.read_only, request.description
        )
        await self._replicated()
        return pb.CreateTokenResponse(info=_token_info(token_id, record), token=token)

    async def list_tokens(self, request: pb.ListTokensRequest, context) -> pb.ListTokensResponse:
        if request.tenant:
            validate_name("tenant", request.tenant)
        return pb.ListTokensResponse(tokens=[_token_info(i, r) for i, r in self.table.tokens(request.tenant)])

    async def revoke_token(self, request: pb.RevokeTokenRequest, context) -> pb.RevokeTokenResponse:
        self._tokens_checked()
        self.table.revoke(request.id)
        await self._replicated()
        return pb.RevokeTokenResponse()

    async def sync_auth(self, request: pb.SyncAuthRequest, context) -> pb.SyncAuthResponse:
        self.table.merge(from_records(request.records))
        return pb.SyncAuthResponse(records=to_records(self.table))

    async def set_namespace_policy(self, request: pb.SetNamespacePolicyRequest, context) -> cluster_pb2.NamespacePolicy:
        policy = request.policy
        ns = namespace_of(policy)
        if policy.HasField("requests_per_second"):
            self.table.set_rate(ns, policy.requests_per_second, policy.burst)
            await self._replicated()
            if not policy.replicas and not policy.write_quorum:  # a rate alone: replication stays as it is
                return self._policy(ns)
        applied = self.cluster.set_policy(ns, policy.replicas, policy.write_quorum)
        if hasattr(self.membership, "put_policy"):  # etcd: every daemon learns it through its watch
            if policy.replicas == 0:
                await self.membership.delete_policy(ns.tenant, ns.subtenant)
            else:
                await self.membership.put_policy(
                    ns.tenant, ns.subtenant, {"replicas": applied.replicas, "write_quorum": applied.write_quorum}
                )
        return self._policy(ns)

    async def get_namespace_policy(self, request: pb.GetNamespacePolicyRequest, context) -> cluster_pb2.NamespacePolicy:
        return self._policy(namespace_of(request))

    def _policy(self, ns: Namespace) -> cluster_pb2.NamespacePolicy:
        policy = policy_to_proto(ns, self.cluster.replication(ns))
        policy.requests_per_second, policy.burst = self.table.rate(ns)
        return policy

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


def _token_info(token_id: str, record: dict) -> pb.TokenInfo:
    return pb.TokenInfo(
        id=token_id,
        tenant=record["tenant"],
        subtenant=record["subtenant"],
        read_only=record["read_only"],
        created=record["created"],
        description=record.get("description", ""),
    )
