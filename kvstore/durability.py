"""How durable a put is when it is acknowledged: the one list of durability names."""

from __future__ import annotations

import enum

from kvstore import errors
from kvstore.protocol.codes import ErrorCode


class Durability(enum.StrEnum):
    MEMORY = "memory"  # in the memory tier of the write quorum (written back to disk soon after)
    DISK = "disk"  # written to the disk tier (the default)
    SYNC = "sync"  # written and fsynced (group-committed)


NAMES: tuple[str, ...] = tuple(level.value for level in Durability)
DEFAULT = Durability.DISK


def parse(value) -> Durability:
    """The durability a caller named ("memory", "disk", "sync", any case)."""
    if isinstance(value, str):
        try:
            return Durability(value.lower())
        except ValueError:
            pass
    raise errors.InvalidArgumentError(
        f"durability {value!r} is unknown; use {', '.join(map(repr, NAMES[:-1]))} or {NAMES[-1]!r}", code=ErrorCode.UNKNOWN_DURABILITY
    )
