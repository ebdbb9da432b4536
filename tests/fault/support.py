"""Helpers shared by the fault tests."""

from __future__ import annotations

import time

from kvstore.client import SyncClient


def emptied_stats(kv: SyncClient, address: str, timeout: float = 10) -> dict:
    """Drop every namespace the daemon at ``address`` knows, until its arena holds no
    bytes or ``timeout`` passes (transfers of dead clients may still be releasing
    extents); the daemon's stats after the last try."""
    deadline = time.monotonic() + timeout
    while True:
        for ns in kv.namespaces():
            with SyncClient(address, tenant=ns["tenant"], subtenant=ns["subtenant"]) as owner:
                owner.drop_namespace()
        stats = kv.server_stats()
        if stats["arena_used_bytes"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)
