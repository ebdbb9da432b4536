"""Helpers shared by the fault tests."""

from __future__ import annotations

import re
import time
import urllib.request

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


def metric(port: int, name: str) -> float:
    """The value of the unlabelled metric ``name`` on the /metrics endpoint at ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)}(?:\{{\}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is not on the metrics endpoint:\n{text[:2000]}"
    return float(match.group(1))
