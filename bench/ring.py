"""Placement ring figures for the README: balance and movement of kvstore.ring.

``python -m bench.ring`` (also ``python -m bench ring``) prints, and ``run()``
returns as a dict:

  balance    the most and least loaded node's primary share over the mean, for
             10 and 100 equal nodes: exact (from the ring's arcs) and sampled
             (keys hashed through ``Ring.primary``)
  movement   the fraction of keys whose primary moves when one node joins a ring
             of N, or the most loaded of N leaves (exact, from the arcs), and the
             fraction of replica copies that move with 3 replicas (sampled), next
             to the ideal 1/(N+1) and 1/N
  speed      building a 100-node ring, and 1000 lookups of 3 owners in it
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from kvstore.ring import DEFAULT_VNODES, Ring

TENANT, SUBTENANT = "bench", "ring"
BALANCE_SIZES = (10, 100)
MOVEMENT_SIZES = (5, 10, 50, 100)
REPLICAS = 3


def _nodes(n: int) -> list[str]:
    return [f"node-{i:03d}" for i in range(n)]


def _keys(n: int, salt: str) -> list[bytes]:
    return [f"{salt}-block-{i:08d}".encode() for i in range(n)]


def balance(n: int, vnodes: int, keys: int) -> dict:
    ring = Ring(_nodes(n), vnodes=vnodes)
    shares = ring.shares().values()
    counts = Counter(ring.primary(TENANT, SUBTENANT, key) for key in _keys(keys, f"balance{n}"))
    mean = keys / n
    return {
        "nodes": n,
        "exact_max_over_mean": max(shares) * n,
        "exact_min_over_mean": min(shares) * n,
        "sampled_keys": keys,
        "sampled_max_over_mean": max(counts.values()) / mean,
        "sampled_min_over_mean": min(counts[node] for node in ring.nodes) / mean,
    }


def _moved_copies(small: Ring, large: Ring, keys: list[bytes]) -> float:
    """Fraction of (key, replica) copies whose node differs between the two rings."""
    moved = 0
    for key in keys:
        before = small.owners(TENANT, SUBTENANT, key, REPLICAS)
        after = large.owners(TENANT, SUBTENANT, key, REPLICAS)
        moved += len(set(after) - set(before))
    return moved / (REPLICAS * len(keys))


def movement(n: int, vnodes: int, keys: int) -> dict:
    nodes = _nodes(n)
    base = Ring(nodes, vnodes=vnodes)
    grown = Ring([*nodes, "node-new"], vnodes=vnodes)
    shares = base.shares()
    leaving = max(shares, key=shares.get)  # the worst case: the most loaded node leaves
    shrunk = Ring([node for node in nodes if node != leaving], vnodes=vnodes)
    sample = _keys(keys, f"move{n}")
    return {
        "nodes": n,
        "add_moved": grown.shares()["node-new"],
        "add_ideal": 1 / (n + 1),
        "add_moved_copies_r3": _moved_copies(base, grown, sample),
        "remove_moved": shares[leaving],
        "remove_ideal": 1 / n,
        "remove_moved_copies_r3": _moved_copies(shrunk, base, sample),
        "sampled_keys": keys,
    }


def speed(vnodes: int) -> dict:
    builds = []
    for _ in range(3):
        started = time.perf_counter()
        ring = Ring(_nodes(100), vnodes=vnodes)
        builds.append(time.perf_counter() - started)
    keys = _keys(1000, "speed")
    lookups = []
    for _ in range(5):
        started = time.perf_counter()
        for key in keys:
            ring.owners(TENANT, SUBTENANT, key, REPLICAS)
        lookups.append(time.perf_counter() - started)
    return {"build_100_nodes_s": min(builds), "lookup_1000_keys_r3_s": min(lookups)}


def run(vnodes: int = DEFAULT_VNODES, keys: int = 1_000_000, movement_keys: int = 20_000) -> dict:
    return {
        "vnodes": vnodes,
        "balance": [balance(n, vnodes, keys) for n in BALANCE_SIZES],
        "movement": [movement(n, vnodes, movement_keys) for n in MOVEMENT_SIZES],
        "speed": speed(vnodes),
    }


def render(figures: dict) -> str:
    lines = [
        f"Placement ring, {figures['vnodes']} virtual nodes per unit weight",
        "",
        "| nodes | max/mean (exact) | min/mean (exact) | max/mean (sampled) | keys sampled |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in figures["balance"]:
        lines.append(
            f"| {b['nodes']} | {b['exact_max_over_mean']:.3f} | {b['exact_min_over_mean']:.3f} "
            f"| {b['sampled_max_over_mean']:.3f} | {b['sampled_keys']:,} |"
        )
    lines += [
        "",
        "| N | join: keys moved (ideal 1/(N+1)) | join: copies moved, R=3 | leave: keys moved (ideal 1/N) | leave: copies moved, R=3 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in figures["movement"]:
        lines.append(
            f"| {m['nodes']} | {m['add_moved']:.2%} ({m['add_ideal']:.2%}) | {m['add_moved_copies_r3']:.2%} "
            f"| {m['remove_moved']:.2%} ({m['remove_ideal']:.2%}) | {m['remove_moved_copies_r3']:.2%} |"
        )
    s = figures["speed"]
    lines += [
        "",
        f"building a 100-node ring: {s['build_100_nodes_s'] * 1e3:.0f} ms; "
        f"1000 lookups of {REPLICAS} owners: {s['lookup_1000_keys_r3_s'] * 1e3:.2f} ms",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.ring", description=__doc__.splitlines()[0])
    p.add_argument("--vnodes", type=int, default=DEFAULT_VNODES, help=f"virtual nodes per unit weight (default {DEFAULT_VNODES})")
    p.add_argument("--keys", type=int, default=1_000_000, help="keys sampled for balance (default 1000000)")
    args = p.parse_args(argv)
    if args.vnodes < 1 or args.keys < 1:
        p.error("--vnodes and --keys must be positive")
    figures = run(args.vnodes, args.keys)
    print(render(figures), end="")
    return figures


if __name__ == "__main__":
    main()
    sys.exit(0)
