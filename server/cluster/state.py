"""Where keys belong: the cluster map this daemon serves (members, epoch,
replication defaults and per-namespace policies) and the ring built from it.

The previous membership is kept while blocks still move to their new owners,
so a daemon keeps accepting writes routed by either map and clients can fall
back to the old owners on a read miss. Both lists are saved in the data dir:
a daemon restarted with a new static peer list still knows where blocks were.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from kvstore._proto.v1 import cluster_pb2
from kvstore.errors import ConfigError, InvalidArgumentError
from kvstore.namespace import Namespace
from kvstore.protocol.convert import policy_to_proto
from kvstore.replication import Replication
from kvstore.ring import Ring
from kvstore.server.cluster.membership import Member, MemberList

log = logging.getLogger("kvstore.server.cluster")

POLICY_FILE = "namespace-policies.json"
MEMBERSHIP_FILE = "membership.json"


def _ring(members: MemberList, vnodes: int) -> Ring:
    return Ring({m.node_id: m.weight for m in members.members}, vnodes=vnodes)


class ClusterState:
    def __init__(
        self, node_id: str, advertise: str, members: MemberList, default: Replication, *, vnodes: int, data_dir: Path
    ) -> None:
        self.node_id = node_id
        self.advertise = advertise
        self.default = default
        self.vnodes = vnodes
        self.members = members
        self.ring = _ring(members, vnodes)
        self.previous: MemberList | None = None
        self.previous_ring: Ring | None = None
        self._membership_path = Path(data_dir) / MEMBERSHIP_FILE
        self._remembered = self._load_membership()
        self._policy_path = Path(data_dir) / POLICY_FILE
        self.policies: dict[Namespace, Replication] = self._load_policies()
        self._listeners: list[Callable[[MemberList, MemberList], None]] = []

    @property
    def epoch(self) -> int:
        return self.members.epoch

    def on_change(self, listener: Callable[[MemberList, MemberList], None]) -> None:
        """Call ``listener(old, new)`` after every membership change."""
        self._listeners.append(listener)

    def update(self, members: MemberList) -> None:
        if members.epoch == self.members.epoch and members.members == self.members.members:
            return
        old = self.members
        if members.members != old.members:
            if old.members:
                self._set_previous(old)
            else:  # the first list since start: compare with what we knew before
                before, unsettled = self._remembered
                if before is not None and before.members != members.members:
                    self._set_previous(before)
                elif unsettled is not None and unsettled.members != members.members:
                    self._set_previous(unsettled)
            self.ring = _ring(members, self.vnodes)
        self.members = members
        self._save_membership()
        log.info("cluster map epoch %d: %s", members.epoch, ", ".join(members.node_ids) or "(empty)")
        for listener in self._listeners:
            listener(old, members)

    def settled(self, epoch: int) -> None:
        """Rebalancing to ``epoch`` finished: the previous owners are no longer needed."""
        if epoch == self.members.epoch and self.previous is not None:
            self.previous = self.previous_ring = None
            self._save_membership()

    def learn_previous(self, members: MemberList) -> bool:
        """A peer's view of where blocks were, for a daemon that has no history of its own
        (one that just joined); True if it was taken."""
        if self.previous is not None or not members.members or members.members == self.members.members:
            return False
        self._set_previous(members)
        self._save_membership()
        return True

    def _set_previous(self, members: MemberList) -> None:
        self.previous, self.previous_ring = members, _ring(members, self.vnodes)

    def _load_membership(self) -> tuple[MemberList | None, MemberList | None]:
        try:
            raw = json.loads(self._membership_path.read_text())
            return _members(raw.get("members")), _members(raw.get("previous"))
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring unreadable %s: %s", self._membership_path, exc)
            return None, None

    def _save_membership(self) -> None:
        _write_json(self._membership_path, {"members": _rows(self.members), "previous": _rows(self.previous)})

    # -- placement --------------------------------------------------------

    def replication(self, ns: Namespace) -> Replication:
        return self.policies.get(ns, self.default)

    def owners(self, ns: Namespace, key: bytes, ring: Ring | None = None) -> list[str]:
        ring = ring or self.ring
        return ring.owners(ns.tenant, ns.subtenant, key, self.replication(ns).replicas)

    def accepts(self, ns: Namespace, key: bytes) -> bool:
        """Whether this daemon owns ``key`` under the current or the previous map."""
        if self.node_id in self.owners(ns, key):
            return True
        return self.previous_ring is not None and self.node_id in self.owners(ns, key, self.previous_ring)

    # -- namespace policies ----------------------------------------------

    def set_policy(self, ns: Namespace, replicas: int, write_quorum: int) -> Replication:
        """Override replication of ``ns``; replicas 0 returns it to the cluster default."""
        if replicas == 0:
            if write_quorum:
                raise InvalidArgumentError("write_quorum needs replicas; give both or neither")
            self.policies.pop(ns, None)
        else:
            try:
                self.policies[ns] = Replication.of(replicas, write_quorum)
            except ConfigError as exc:
                raise InvalidArgumentError(str(exc)) from None
        self._save_policies()
        return self.replication(ns)

    def replace_policies(self, policies: dict[Namespace, Replication]) -> None:
        self.policies = dict(policies)
        self._save_policies()

    def _load_policies(self) -> dict[Namespace, Replication]:
        try:
            raw = json.loads(self._policy_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self._policy_path, exc)
            return {}
        return {Namespace(t, s): Replication(r, w) for t, s, r, w in raw}

    def _save_policies(self) -> None:
        rows = [[ns.tenant, ns.subtenant, p.replicas, p.write_quorum] for ns, p in sorted(
            self.policies.items(), key=lambda item: (item[0].tenant, item[0].subtenant))]
        _write_json(self._policy_path, rows)

    # -- the wire form ----------------------------------------------------

    def to_proto(self) -> cluster_pb2.ClusterMap:
        message = cluster_pb2.ClusterMap(
            epoch=self.epoch,
            nodes=[_node(m) for m in self.members.members],
            replicas=self.default.replicas,
            write_quorum=self.default.write_quorum,
            vnodes=self.vnodes,
        )
        message.policies.extend(policy_to_proto(ns, policy) for ns, policy in self.policies.items())
        if self.previous is not None:
            message.previous_epoch = self.previous.epoch
            message.previous_nodes.extend(_node(m) for m in self.previous.members)
        return message


def _node(member) -> cluster_pb2.Node:
    return cluster_pb2.Node(node_id=member.node_id, address=member.address, weight=member.weight)


def _write_json(path: Path, data) -> None:
    """Replace ``path`` atomically: a crash leaves the old file or the new one."""
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _rows(members: MemberList | None):
    if members is None or not members.members:
        return None
    return {"epoch": members.epoch, "nodes": [[m.node_id, m.address, m.weight] for m in members.members]}


def _members(rows) -> MemberList | None:
    if not rows:
        return None
    return MemberList(int(rows["epoch"]), tuple(Member(n, a, float(w)) for n, a, w in rows["nodes"]))
