"""Admin and statistics: namespace counters, daemon statistics, replication
policies, creating, listing and dropping namespaces, data tokens; answers as
plain dicts. Under ``--auth token`` all but ``stat`` need the admin token as
the client's credential."""

from __future__ import annotations

from kvstore import errors
from kvstore._proto.v1 import admin_pb2, cluster_pb2, data_pb2
from kvstore.client.mapcache import MapCache
from kvstore.namespace import validate_name


class Admin:
    def __init__(self, namespace: data_pb2.Namespace, maps: MapCache) -> None:
        self.namespace = namespace
        self.maps = maps

    async def stat(self) -> dict:
        responses = await self.maps.broadcast("data", "Stat", data_pb2.StatRequest(namespace=self.namespace))
        return {
            "tenant": self.namespace.tenant,
            "subtenant": self.namespace.subtenant,
            "blocks": sum(r.stats.blocks for r in responses),
            "bytes": sum(r.stats.bytes for r in responses),
            "nodes": len(responses),
        }

    async def server_stats(self) -> dict:
        return server_stats(await self.maps.any_node("admin", "ServerStats", admin_pb2.ServerStatsRequest()))

    async def cluster_stats(self) -> list[dict]:
        await self.maps.connect()
        view = self.maps.view
        timeout = min(2.0, self.maps.config.attempt_timeout)

        async def stats(node: str) -> dict:
            return server_stats(await self.maps.call(node, "admin", "ServerStats", admin_pb2.ServerStatsRequest(), timeout))

        return [
            {"node_id": node, "address": view.addresses[node], "up": False, "error": result.message}
            if isinstance(result, errors.KVStoreError)
            else {**result, "up": True}
            for node, result in await self.maps.every_node(stats, view.nodes)
        ]

    async def set_replication(self, replicas: int, write_quorum: int) -> dict:
        policy = cluster_pb2.NamespacePolicy(namespace=self.namespace, replicas=replicas, write_quorum=write_quorum)
        responses = await self.maps.broadcast(
            "admin", "SetNamespacePolicy", admin_pb2.SetNamespacePolicyRequest(policy=policy), tolerate=False
        )
        await self.maps.refresh()
        applied = responses[0]
        return {"replicas": applied.replicas, "write_quorum": applied.write_quorum}

    async def set_rate_limit(self, requests_per_second: float, burst: int = 0) -> dict:
        """Requests per second each daemon serves this namespace (0: unlimited)."""
        policy = cluster_pb2.NamespacePolicy(namespace=self.namespace, requests_per_second=requests_per_second, burst=burst)
        responses = await self.maps.broadcast(
            "admin", "SetNamespacePolicy", admin_pb2.SetNamespacePolicyRequest(policy=policy), tolerate=False
        )
        return {"requests_per_second": responses[0].requests_per_second, "burst": responses[0].burst}

    async def replication(self) -> dict:
        await self.maps.connect()
        r = self.maps.view.replication(self.namespace.tenant, self.namespace.subtenant)
        return {"replicas": r.replicas, "write_quorum": r.write_quorum}

    async def namespaces(self, tenant: str) -> list[dict]:
        merged: dict[tuple[str, str], dict] = {}
        for r in await self.maps.broadcast("admin", "ListNamespaces", admin_pb2.ListNamespacesRequest(tenant=tenant)):
            for n in r.namespaces:
                entry = merged.setdefault(
                    (n.namespace.tenant, n.namespace.subtenant),
                    {"tenant": n.namespace.tenant, "subtenant": n.namespace.subtenant, "blocks": 0, "bytes": 0},
                )
                entry["blocks"] += n.blocks
                entry["bytes"] += n.bytes
        return [merged[k] for k in sorted(merged)]

    async def drop_namespace(self, namespace: data_pb2.Namespace | None = None) -> dict:
        request = admin_pb2.DropNamespaceRequest(namespace=namespace or self.namespace)
        responses = await self.maps.broadcast("admin", "DropNamespace", request, tolerate=False)
        return {"blocks": sum(r.blocks for r in responses), "bytes": sum(r.bytes for r in responses)}

    async def create_namespace(self, namespace: data_pb2.Namespace | None = None) -> bool:
        """Whether it was created (False: it existed). The daemon that answers
        has handed it to every member it could reach before it does."""
        request = admin_pb2.CreateNamespaceRequest(namespace=namespace or self.namespace)
        return (await self.maps.any_node("admin", "CreateNamespace", request)).created

    async def create_token(self, tenant: str, subtenant: str = "", *, read_only: bool = False, description: str = "") -> dict:
        validate_name("tenant", tenant)
        if subtenant:
            validate_name("subtenant", subtenant)
        request = admin_pb2.CreateTokenRequest(
            tenant=tenant, subtenant=subtenant, read_only=read_only, description=description
        )
        response = await self.maps.any_node("admin", "CreateToken", request)
        return {**token_info(response.info), "token": response.token}

    async def tokens(self, tenant: str = "") -> list[dict]:
        response = await self.maps.any_node("admin", "ListTokens", admin_pb2.ListTokensRequest(tenant=tenant))
        return [token_info(t) for t in response.tokens]

    async def revoke_token(self, token_id: str) -> None:
        await self.maps.any_node("admin", "RevokeToken", admin_pb2.RevokeTokenRequest(id=token_id))


def token_info(t: admin_pb2.TokenInfo) -> dict:
    return {
        "id": t.id, "tenant": t.tenant, "subtenant": t.subtenant, "read_only": t.read_only,
        "created": t.created, "description": t.description,
    }


def server_stats(r: admin_pb2.ServerStatsResponse) -> dict:
    rebalance = r.rebalance
    return {
        "node_id": r.node_id,
        "address": r.address,
        "data_dir": r.data_dir,
        "version": r.version,
        "uptime_seconds": r.uptime_seconds,
        "tiers": {
            t.name: {"blocks": t.blocks, "bytes": t.bytes, "capacity_bytes": t.capacity_bytes, "resident_bytes": t.resident_bytes}
            for t in r.tiers
        },
        "namespaces": r.namespaces,
        "corrupt_blocks": r.corrupt_blocks,
        "evictions": r.evictions,
        "requests": r.requests,
        "data_plane": {"enabled": r.data_plane, "ucx_tls": r.ucx_tls, "clients": r.data_plane_clients},
        "arena_used_bytes": r.arena_used_bytes,
        "cluster": {"epoch": r.cluster_epoch, "nodes": r.cluster_nodes, "membership": r.membership},
        "rebalance": {
            "state": rebalance.state or "idle",
            "epoch": rebalance.epoch,
            "keys_scanned": rebalance.keys_scanned,
            "keys_total": rebalance.keys_total,
            "keys_copied": rebalance.keys_copied,
            "bytes_copied": rebalance.bytes_copied,
            "keys_dropped": rebalance.keys_dropped,
            "errors": rebalance.errors,
            "last_error": rebalance.last_error,
        },
    }
