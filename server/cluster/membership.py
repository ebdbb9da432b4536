"""Who is in the cluster: a ``MemberList`` with an epoch, from a static peer
list (``StaticMembership``, the embedded default) or from etcd
(``kvstore.server.cluster.etcd.EtcdMembership``)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable

import xxhash

from kvstore.errors import ConfigError
from kvstore.namespace import validate_name
from kvstore.units import parse_address


@dataclass(frozen=True)
class Member:
    node_id: str
    address: str  # gRPC "host:port" that clients and peers dial
    weight: float = 1.0  # relative capacity on the ring


@dataclass(frozen=True)
class MemberList:
    # Identifies this membership. Under etcd it is the store revision of the
    # last change, so it increases; with static peers it is a digest of the
    # list, so every daemon given the same --peers agrees on it.
    epoch: int
    members: tuple[Member, ...]  # sorted by node_id

    @classmethod
    def of(cls, members: Iterable[Member], epoch: int | None = None) -> "MemberList":
        ordered = tuple(sorted(members, key=lambda m: m.node_id))
        if epoch is None:
            epoch = static_epoch(ordered)
        return cls(epoch, ordered)

    def get(self, node_id: str) -> Member | None:
        for member in self.members:
            if member.node_id == node_id:
                return member
        return None

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members)


def static_epoch(members: Iterable[Member]) -> int:
    """A digest of a member list, in 1 .. 2**63-1."""
    text = json.dumps([[m.node_id, m.address, m.weight] for m in members])
    return (xxhash.xxh3_64_intdigest(text.encode()) & ((1 << 63) - 1)) or 1


def parse_peers(text: str) -> tuple[Member, ...]:
    """Members from "id1=host:port,id2=host:port[@weight],...".

    A weight after "@" sets the node's relative capacity (default 1).
    """
    members: dict[str, Member] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        node_id, sep, rest = item.partition("=")
        if not sep or not node_id or not rest:
            raise ConfigError(f"peers: {item!r} is not ID=HOST:PORT")
        try:
            validate_name("node id", node_id)
        except Exception as exc:
            raise ConfigError(f"peers: {exc}") from None
        address, at, weight_text = rest.partition("@")
        try:
            parse_address(address)
        except ValueError as exc:
            raise ConfigError(f"peers: {exc}") from None
        weight = 1.0
        if at:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ConfigError(f"peers: weight {weight_text!r} of {node_id} is not a number") from None
            if not weight > 0:
                raise ConfigError(f"peers: weight of {node_id} must be positive")
        if node_id in members:
            raise ConfigError(f"peers: node id {node_id!r} appears twice")
        members[node_id] = Member(node_id, address, weight)
    return tuple(members.values())


class Membership(ABC):
    """A source of member lists. ``start`` returns the first; later changes
    are passed to ``on_change`` on the event loop. A source that also keeps
    namespace policies cluster-wide (etcd) passes its whole table to
    ``on_policies`` at start and after every change."""

    @abstractmethod
    async def start(
        self,
        on_change: Callable[[MemberList], None],
        on_policies: Callable[[dict[tuple[str, str], dict]], None] | None = None,
    ) -> MemberList: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def current(self) -> MemberList: ...

    def status(self) -> dict:
        return {"kind": type(self).__name__}


class StaticMembership(Membership):
    """A fixed list: this daemon plus its --peers (a lone daemon is a cluster of one)."""

    def __init__(self, me: Member, peers: Iterable[Member] = ()) -> None:
        members = {m.node_id: m for m in peers}
        listed = members.get(me.node_id)
        if listed is not None and listed.address != me.address:
            # The peer list names how others reach us; trust it over our bind address.
            me = Member(me.node_id, listed.address, listed.weight)
        members[me.node_id] = me
        self._list = MemberList.of(members.values())

    async def start(self, on_change, on_policies=None) -> MemberList:
        return self._list

    async def stop(self) -> None:
        pass

    def current(self) -> MemberList:
        return self._list

    def status(self) -> dict:
        return {"kind": "static", "connected": True}
