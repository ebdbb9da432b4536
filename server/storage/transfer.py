"""What storage needs of a zero-copy transfer: one object per request that moves
bytes between arena extents and the client's memory.

``BlockStore.put_remote`` and ``BlockStore.get_remote`` reserve or pin arena
extents and hand their offsets, with the matching client addresses, to a
``Transfer``. The data plane (server/dataplane.py) implements it, over RMA or
over the client's shared memory, chosen once per request; storage never learns
which, nor anything of sessions, endpoints or the RPC layer.
"""

from __future__ import annotations

from typing import Protocol


class Transfer(Protocol):
    """Moves the bytes of one request's blocks between the arena and one client region.

    Offsets are into the memory tier's arena, addresses are the client's (as the
    request gave them), one entry per block, in the same order.
    """

    @property
    def checksums_while_copying(self) -> bool:
        """Whether both methods return the xxh3-64 of each block's bytes, computed
        as they copied them (shared memory). When False (RMA) they return None and
        storage hashes the arena bytes itself where it must."""
        ...

    async def read_into_arena(
        self, arena_offsets: list[int], remote_addresses: list[int], sizes: list[int]
    ) -> list[int] | None:
        """Fill arena extents with client bytes (a put); the xxh3-64 of each block or None."""
        ...

    async def write_from_arena(
        self, arena_offsets: list[int], remote_addresses: list[int], lengths: list[int]
    ) -> list[int] | None:
        """Write arena extents into the client's memory (a get); the xxh3-64 of each
        block's arena bytes, or None."""
        ...
