"""Prefix-lookup latency: what an engine's scheduler waits for on every request.

``python -m bench lookups`` (also ``python -m bench.lookups``) starts one daemon,
stores a chain of keys and times ``lookup_prefix`` and ``exists`` of 1 to 4 096
keys, all stored (the whole chain is checked), from a client on this host over
the local channel and from one that speaks gRPC as a client on another host
does (``local_channel=False``). Beside them, the floor of the path: the same
``LookupPrefix`` request sent by a bare grpc.aio stub, and over the local
channel by the SDK's own connection with no routing around it. Targets (64
keys, p50): 0.2 ms co-located, 0.5 ms over gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bench.kvstore_runner import start_daemon

KEY_COUNTS = (1, 16, 64, 256, 1024, 4096)
TARGET_KEYS = 64
TARGETS_MS = {"local channel": 0.2, "gRPC": 0.5}
TENANT, SUBTENANT = "bench", "lookups"


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _timed(call, rounds: int, warm: int) -> tuple[float, float]:
    for _ in range(warm):
        await call()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


async def measure(address: str, rounds: int, counts=KEY_COUNTS) -> list[dict]:
    """One row per (path, call, key count): p50 and p99 in seconds."""
    import grpc

    from kvstore._proto.v1 import data_pb2, data_pb2_grpc
    from kvstore.client import Client

    keys = [b"lookup/chain/%08d" % i for i in range(max(counts))]
    rows = []
    async with Client(address, tenant=TENANT, subtenant=SUBTENANT, transport="inline") as writer:
        await writer.put_many([(k, b"v") for k in keys])
    for path, local in (("local channel", True), ("gRPC", False)):
        async with Client(address, tenant=TENANT, subtenant=SUBTENANT, transport="inline", local_channel=local) as c:
            await c.connect()
            for n in counts:
                chain = keys[:n]
                turns = max(20, rounds // max(1, n // 64))
                for call, fn in (("lookup_prefix", c.lookup_prefix), ("exists", c.exists)):
                    p50, p99 = await _timed(lambda: fn(chain), turns, max(5, turns // 10))
                    rows.append({"path": path, "call": call, "keys": n, "p50": p50, "p99": p99})
    request = data_pb2.KeysRequest(namespace=data_pb2.Namespace(tenant=TENANT, subtenant=SUBTENANT), keys=keys[:TARGET_KEYS])
    async with grpc.aio.insecure_channel(address) as channel:
        stub = data_pb2_grpc.DataStub(channel)
        p50, p99 = await _timed(lambda: stub.LookupPrefix(request), rounds, rounds // 10)
        rows.append({"path": "gRPC", "call": "bare grpc.aio LookupPrefix", "keys": TARGET_KEYS, "p50": p50, "p99": p99})
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "| path | call | keys | p50 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['path']} | {r['call']} | {r['keys']} | {r['p50'] * 1e3:.3f} | {r['p99'] * 1e3:.3f} |")
    lines.append("")
    for path, target in TARGETS_MS.items():
        row = next(r for r in rows if r["path"] == path and r["call"] == "lookup_prefix" and r["keys"] == TARGET_KEYS)
        verdict = "PASS" if row["p50"] * 1e3 <= target else "MISS"
        lines.append(f"- {path}, lookup_prefix of {TARGET_KEYS} keys: p50 {row['p50'] * 1e3:.3f} ms, target ≤ {target} ms: **{verdict}**")
    return "\n".join(lines)


def run(rounds: int = 2000, counts=KEY_COUNTS) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="kvstore-lookups-") as directory:
        daemon = start_daemon(Path(directory) / "data", "256MiB")
        try:
            return asyncio.run(measure(daemon.address, rounds, counts))
        finally:
            daemon.stop(60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench lookups", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2000, help="timed calls per row of 64 keys (default 2000)")
    p.add_argument("--quick", action="store_true", help="a smoke-test sized run")
    args = p.parse_args(argv)
    rows = run(50 if args.quick else args.rounds, (1, 64) if args.quick else KEY_COUNTS)
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
