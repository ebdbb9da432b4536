"""How many daemons hold a namespace's blocks, and how many must acknowledge a write."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import ConfigError


@dataclass(frozen=True)
class Replication:
    replicas: int
    write_quorum: int

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas: {self.replicas} must be at least 1")
        if not 1 <= self.write_quorum <= self.replicas:
            raise ConfigError(f"write_quorum: {self.write_quorum} must be between 1 and replicas ({self.replicas})")

    @classmethod
    def of(cls, replicas: int, write_quorum: int = 0) -> "Replication":
        """``write_quorum`` 0 means a majority of the replicas."""
        return cls(replicas, write_quorum or replicas // 2 + 1)

    def within(self, nodes: int) -> "Replication":
        """This replication in a cluster of ``nodes`` (no more replicas than nodes)."""
        replicas = min(self.replicas, max(1, nodes))
        return self if replicas == self.replicas else Replication(replicas, min(self.write_quorum, replicas))
