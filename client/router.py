"""Where a key's requests go: the client's copy of the cluster map.

``ClusterView`` turns a ``kvstore.v1.ClusterMap`` into the same ring every
daemon builds, and answers, per key, which daemons to write (the R owners,
then the next nodes of the ring for those that fail) and which to read (the
owners in ring order, then the owners under the previous map while blocks are
still moving, then the next nodes of the ring for those that fail).
"""

from __future__ import annotations

import time

from kvstore._proto.v1 import cluster_pb2
from kvstore.protocol.convert import replication_of
from kvstore.replication import Replication
from kvstore.ring import DEFAULT_VNODES, Ring

# Nodes after a key's owners that a request may move on to when owners fail.
STAND_INS = 3


class ClusterView:
    """``prior`` is the view this one replaces: when the map does not say where
    blocks were before (a daemon that just joined does not know), the members
    of the prior view that are still in the cluster stand in as previous owners."""

    def __init__(
        self,
        cluster_map: cluster_pb2.ClusterMap,
        aliases: dict[str, str] | None = None,
        prior: "ClusterView | None" = None,
    ) -> None:
        self.map = cluster_map
        self.epoch = cluster_map.epoch
        vnodes = cluster_map.vnodes or DEFAULT_VNODES
        # How this client reaches each node: the address the map advertises,
        # unless the client reached that node under another name (a Service
        # name, a port-forward) when it said hello.
        self.addresses = {n.node_id: n.address for n in cluster_map.nodes}
        self.addresses.update({k: v for k, v in (aliases or {}).items() if k in self.addresses})
        self.ring = Ring({n.node_id: n.weight or 1.0 for n in cluster_map.nodes}, vnodes=vnodes)
        self.previous_ring = None
        self.previous_members: frozenset[str] = frozenset()
        if cluster_map.previous_nodes:
            for n in cluster_map.previous_nodes:
                self.addresses.setdefault(n.node_id, (aliases or {}).get(n.node_id, n.address))
            self.previous_ring = Ring({n.node_id: n.weight or 1.0 for n in cluster_map.previous_nodes}, vnodes=vnodes)
            self.previous_members = frozenset(n.node_id for n in cluster_map.previous_nodes)
        elif prior is not None and set(prior.ring.nodes) != set(self.ring.nodes):
            self.previous_ring = prior.ring
            self.previous_members = frozenset(prior.ring.nodes) & frozenset(self.ring.nodes)
        self.default = replication_of(cluster_map.replicas, cluster_map.write_quorum)
        self.policies = {
            (p.namespace.tenant, p.namespace.subtenant): replication_of(p.replicas, p.write_quorum)
            for p in cluster_map.policies
        }
        self._replication: dict[tuple[str, str], Replication] = {}
        # A cluster of one (the embedded default) with nothing moving: every key's
        # only node, without hashing each key.
        self.sole_node = self.ring.nodes[0] if len(self.ring) == 1 and self.previous_ring is None else None

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.ring.nodes

    @property
    def all_nodes(self) -> list[str]:
        """The members, then the previous members blocks may still be on."""
        return list(dict.fromkeys(list(self.ring.nodes) + [n.node_id for n in self.map.previous_nodes]))

    def replication(self, tenant: str, subtenant: str) -> Replication:
        found = self._replication.get((tenant, subtenant))
        if found is None:
            policy = self.policies.get((tenant, subtenant), self.default)
            found = self._replication[(tenant, subtenant)] = policy.within(len(self.ring))
        return found

    def write_order(self, tenant: str, subtenant: str, key: bytes) -> tuple[list[str], int]:
        """The key's owners and the next nodes of the ring that stand in for
        failed ones, in ring order, and how many of them are its owners."""
        if self.sole_node is not None:
            return [self.sole_node], 1
        replicas = self.replication(tenant, subtenant).replicas
        order = self.ring.owners(tenant, subtenant, key, min(len(self.ring), replicas + STAND_INS))
        return order, replicas

    def read_order(self, tenant: str, subtenant: str, key: bytes) -> tuple[list[str], int]:
        """Nodes to ask in turn, and how many of them are worth asking when all
        answer (owners, then previous owners); the rest stand in for failed ones."""
        if self.sole_node is not None:
            return [self.sole_node], 1
        order, replicas = self.write_order(tenant, subtenant, key)
        asked = order[:replicas]
        if self.previous_ring is not None:
            for node in self.previous_ring.owners(tenant, subtenant, key, replicas):
                if node not in asked and node in self.previous_members:
                    asked.append(node)
        rest = [n for n in order if n not in asked]
        return asked + rest, len(asked)


class DownNodes:
    """Nodes that just failed a request, skipped for a moment so that the next
    requests go straight to a replica instead of waiting out the same failure."""

    def __init__(self, hold: float = 1.0) -> None:
        self.hold = hold
        self._until: dict[str, float] = {}

    def mark(self, node: str) -> None:
        self._until[node] = time.monotonic() + self.hold

    def clear(self, node: str) -> None:
        self._until.pop(node, None)

    def any_marked(self) -> bool:
        """False when no node is down (True may include holds that just expired)."""
        return bool(self._until)

    def is_down(self, node: str) -> bool:
        until = self._until.get(node)
        if until is None:
            return False
        if until < time.monotonic():
            del self._until[node]
            return False
        return True

    def prefer_up(self, nodes: list[str]) -> list[str]:
        """``nodes`` with the down ones moved to the end, so that the next up
        nodes of the ring stand in for them."""
        if not self.any_marked():  # the usual case: nothing failed lately
            return nodes
        up = [n for n in nodes if not self.is_down(n)]
        return up + [n for n in nodes if n not in up]
