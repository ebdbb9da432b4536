"""Rebalancing: when members join or leave, blocks move to their new owners
in the background while every acknowledged block stays readable, and in the
end each daemon holds exactly the blocks the ring gives it."""

from __future__ import annotations

import os
import random
import time

from kvstore.client import SyncClient
from tests.fault.support import Readers, wait_for_placement


def settled_stats(kv: SyncClient, timeout: float = 60.0) -> dict[str, dict]:
    """cluster_stats() by node once every daemon is idle at its map's epoch and
    its last pass moved nothing (with a short --rebalance-interval a pass can
    be under way at any one moment, so one sample is not enough)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = {s["node_id"]: s for s in kv.cluster_stats()}
        unsettled = {
            node: s.get("rebalance", s.get("error"))
            for node, s in stats.items()
            if not s["up"]
            or s["rebalance"]["state"] != "idle"
            or s["rebalance"]["epoch"] != s["cluster"]["epoch"]
            or s["rebalance"]["keys_copied"]
            or s["rebalance"]["keys_dropped"]
        }
        if not unsettled:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"rebalancing did not settle within {timeout}s: {unsettled}")
        time.sleep(0.2)


def test_join_and_leave_move_blocks_and_keep_every_block_readable(local_cluster, tenant):
    cluster = local_cluster(3, "--replicas", "2", "--rebalance-interval", "1")
    values = {f"block-{i}".encode(): os.urandom(random.Random(i).choice((300, 5000, 70000))) for i in range(300)}
    kv = SyncClient(cluster.endpoints, tenant=tenant)
    try:
        kv.put_many(values)
    finally:
        kv.close()
    wait_for_placement(cluster, tenant, values, replicas=2)
    with Readers(cluster, tenant, values) as readers:
        readers.phase = "join"
        cluster.reconfigure(["node1", "node2", "node3", "node4"])  # a 4th daemon joins
        readers.phase = "join-settle"
        wait_for_placement(cluster, tenant, values, replicas=2)
        readers.phase = "leave"
        cluster.reconfigure(["node1", "node3", "node4"])  # node2 leaves
        readers.phase = "leave-settle"
        wait_for_placement(cluster, tenant, values, replicas=2)
    assert not readers.failures, readers.failures[:10]
    assert readers.reads > 0
    kv = SyncClient(cluster.endpoints, tenant=tenant)
    try:
        stats = settled_stats(kv)
        assert set(stats) == {"node1", "node3", "node4"}
        assert len({s["cluster"]["epoch"] for s in stats.values()}) == 1
        assert {s["rebalance"]["state"] for s in stats.values()} == {"idle"}
        assert kv.get_many(list(values)) == list(values.values())
    finally:
        kv.close()
