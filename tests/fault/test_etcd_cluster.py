"""A cluster whose membership lives in a real etcd: daemons join and leave
under load while every block stays readable, and etcd itself restarting
under load does not stop the cluster."""

from __future__ import annotations

import os
import random
import time

from kvstore.client import SyncClient
from tests.etcd_server import etcd_server  # noqa: F401  (a real etcd per test)
from tests.fault.support import Readers, Workload, cluster_client, wait_for_placement


def wait_for_members(cluster, tenant: str, timeout: float = 30.0) -> dict:
    """Until every daemon serves one map naming exactly the cluster's nodes; returns it."""
    deadline = time.monotonic() + timeout
    kv = SyncClient(cluster.endpoints, tenant=tenant)
    try:
        while True:
            stats = kv.cluster_stats()
            maps = kv.refresh_map()
            names = sorted(n["node_id"] for n in maps["nodes"])
            epochs = {s["cluster"]["epoch"] for s in stats if s["up"]}
            if names == sorted(cluster.ids) and len(epochs) == 1 and all(s["up"] for s in stats):
                return maps
            if time.monotonic() > deadline:
                raise AssertionError(f"members did not converge: map {names}, epochs {epochs}, want {cluster.ids}")
            time.sleep(0.2)
    finally:
        kv.close()


def test_daemons_join_and_leave_through_etcd_under_load(local_cluster, etcd_server, tenant):
    cluster = local_cluster(3, "--replicas", "2", "--rebalance-interval", "1", etcd=etcd_server.endpoint)
    first = wait_for_members(cluster, tenant)
    values = {f"blk-{i}".encode(): os.urandom(random.Random(i).choice((1000, 20000))) for i in range(200)}
    kv = SyncClient(cluster.endpoints, tenant=tenant)
    try:
        kv.put_many(values)
    finally:
        kv.close()
    with Readers(cluster, tenant, values) as readers:
        cluster.add("node4")
        grown = wait_for_members(cluster, tenant)
        assert grown["epoch"] > first["epoch"]  # etcd epochs only grow
        wait_for_placement(cluster, tenant, values, replicas=2)
        cluster.remove("node2")
        shrunk = wait_for_members(cluster, tenant)
        assert shrunk["epoch"] > grown["epoch"]
        wait_for_placement(cluster, tenant, values, replicas=2)
    assert not readers.failures, readers.failures[:10]
    assert readers.reads > 0


def test_etcd_restart_under_load_keeps_the_cluster_serving(local_cluster, etcd_server, tenant):
    cluster = local_cluster(3, "--replicas", "2", etcd=etcd_server.endpoint)
    before = wait_for_members(cluster, tenant)
    with Workload(cluster, tenant, writers=2, seed=5) as load:
        time.sleep(1.0)
        etcd_server.stop(kill=True)
        time.sleep(2.0)  # the cluster serves on its last map meanwhile
        served_without_etcd = len(load.acked)
        time.sleep(1.0)
        assert len(load.acked) > served_without_etcd, "no writes were acknowledged while etcd was down"
        etcd_server.start()
        time.sleep(1.5)
    assert not load.failures, load.failures[:10]
    assert load.put_errors == 0
    after = wait_for_members(cluster, tenant)  # everyone re-registered
    assert sorted(n["node_id"] for n in after["nodes"]) == sorted(n["node_id"] for n in before["nodes"])
    kv = cluster_client(cluster, tenant)
    try:
        stats = kv.cluster_stats()
        assert all(s["up"] and s["cluster"]["membership"] == "etcd" for s in stats)
        keys = list(load.acked)
        assert kv.get_many(keys) == [load.acked[k] for k in keys]
    finally:
        kv.close()
