"""The one rule by which a zero-copy request falls back to a slower path.

A daemon answers a zero-copy request it cannot serve that way with one of two
codes, and the SDK resends it the way the code says:

- BLOCK_EXCEEDS_MEMORY_TIER (RESOURCE_EXHAUSTED): a block is larger than the
  daemon's memory tier can stage: send it inline, inside the gRPC message.
- SHARED_MEMORY_UNAVAILABLE (INVALID_ARGUMENT): a put left the checksums to a
  daemon that cannot map the client's shared memory: resend it with
  checksums, and the daemon reads the region by RMA.
"""

from __future__ import annotations

import enum

from kvstore import errors
from kvstore.protocol.codes import ErrorCode


class Fallback(enum.Enum):
    INLINE = "inline"
    WITH_CHECKSUMS = "with checksums"


def fallback_of(exc: errors.KVStoreError) -> Fallback | None:
    """How to resend the request that failed with ``exc``; None: it failed for good."""
    if isinstance(exc, errors.ResourceExhaustedError) and exc.code == ErrorCode.BLOCK_EXCEEDS_MEMORY_TIER:
        return Fallback.INLINE
    if isinstance(exc, errors.InvalidArgumentError) and exc.code == ErrorCode.SHARED_MEMORY_UNAVAILABLE:
        return Fallback.WITH_CHECKSUMS
    return None
