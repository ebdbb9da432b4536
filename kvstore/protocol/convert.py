"""Durability, namespaces and replication to and from their protobuf forms."""

from __future__ import annotations

from kvstore import errors
from kvstore._proto.v1 import cluster_pb2, data_pb2
from kvstore.durability import Durability
from kvstore.namespace import Namespace
from kvstore.protocol.codes import ErrorCode
from kvstore.replication import Replication

_TO_PROTO = {
    Durability.MEMORY: data_pb2.DURABILITY_MEMORY,
    Durability.DISK: data_pb2.DURABILITY_DISK,
    Durability.SYNC: data_pb2.DURABILITY_SYNC,
}
_FROM_PROTO = {number: level for level, number in _TO_PROTO.items()}


def durability_to_proto(level: Durability) -> int:
    return _TO_PROTO[level]


def durability_from_proto(number: int, default: Durability) -> Durability:
    """The durability a request asks for (``default`` when it names none)."""
    if number == data_pb2.DURABILITY_UNSPECIFIED:
        return default
    try:
        return _FROM_PROTO[number]
    except KeyError:
        raise errors.InvalidArgumentError(
            f"durability {number} is unknown; use MEMORY (1), DISK (2) or SYNC (3)", code=ErrorCode.UNKNOWN_DURABILITY
        ) from None


def namespace_to_proto(ns: Namespace) -> data_pb2.Namespace:
    return data_pb2.Namespace(tenant=ns.tenant, subtenant=ns.subtenant)


def namespace_of(message) -> Namespace:
    """The validated namespace a request (or policy) names."""
    if not message.HasField("namespace"):
        raise errors.InvalidArgumentError(
            "the request names no namespace (tenant, subtenant)", code=ErrorCode.INVALID_NAMESPACE
        )
    return Namespace(message.namespace.tenant, message.namespace.subtenant)


def replication_of(replicas: int, write_quorum: int) -> Replication:
    """The replication a cluster map states (0s, which an older or joining daemon sends, as 1)."""
    replicas = max(1, replicas)
    return Replication(replicas, min(max(1, write_quorum), replicas))


def policy_to_proto(ns: Namespace, replication: Replication) -> cluster_pb2.NamespacePolicy:
    return cluster_pb2.NamespacePolicy(
        namespace=namespace_to_proto(ns), replicas=replication.replicas, write_quorum=replication.write_quorum
    )
