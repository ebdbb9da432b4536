"""Replication across subprocess daemons: per-namespace replicas and write
quorum set through the CLI, placement by the ring, read repair."""

from __future__ import annotations

import asyncio
import json
import os

from kvstore._proto.v1 import data_pb2
from kvstore.client import SyncClient
from kvstore.client.connection import Connection
from kvstore.ring import Ring
from tests.conftest import kvstore_cli
from tests.fault.support import flip, locate


def delete_on(address: str, tenant: str, keys: list[bytes]) -> int:
    """Delete keys on one daemon only (a replica lost behind the cluster's back)."""

    async def go() -> int:
        conn = Connection(address)
        try:
            request = data_pb2.KeysRequest(namespace=data_pb2.Namespace(tenant=tenant, subtenant="default"), keys=keys)
            return (await conn.data.Delete(request, timeout=10)).deleted
        finally:
            await conn.close()

    return asyncio.run(go())


def disk_blocks(kv: SyncClient) -> dict[str, int]:
    return {s["node_id"]: s["tiers"]["disk"]["blocks"] for s in kv.cluster_stats()}


def test_namespace_replication_set_by_cli_places_copies_by_the_ring(local_cluster, tenant):
    cluster = local_cluster(3, "--replicas", "1")
    endpoints = ",".join(cluster.endpoints)
    done = kvstore_cli("--endpoint", endpoints, "--json", "ns", "set", "--tenant", tenant, "--subtenant", "triple",
                       "--replicas", "3", "--write-quorum", "2")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"tenant": tenant, "subtenant": "triple", "replicas": 3, "write_quorum": 2}
    shown = kvstore_cli("--endpoint", endpoints, "--tenant", tenant, "--subtenant", "triple", "ns", "get")
    assert shown.returncode == 0 and b"3 replicas, write quorum 2" in shown.stdout, shown
    bad = kvstore_cli("--endpoint", endpoints, "ns", "set", "--tenant", tenant, "--replicas", "2", "--write-quorum", "3")
    assert bad.returncode == 2 and b"write_quorum" in bad.stderr, bad

    values = {f"k{i}".encode(): os.urandom(100 + i) for i in range(60)}
    triple = SyncClient(cluster.endpoints, tenant=tenant, subtenant="triple")
    single = SyncClient(cluster.endpoints, tenant=tenant)
    try:
        assert triple.replication() == {"replicas": 3, "write_quorum": 2}
        assert single.replication() == {"replicas": 1, "write_quorum": 1}
        triple.put_many(values)
        single.put_many(values)
        stats = {s["node_id"]: s for s in single.cluster_stats()}
        # Every node holds all 60 blocks of "triple"; "default" is spread one copy each, by the ring.
        ring = Ring(cluster.ids)
        spread = {node: sum(ring.primary(tenant, "default", k) == node for k in values) for node in cluster.ids}
        for node in cluster.ids:
            assert stats[node]["tiers"]["disk"]["blocks"] == 60 + spread[node]
        assert triple.get_many(list(values)) == list(values.values())
        assert single.get_many(list(values)) == list(values.values())
        assert triple.stat()["blocks"] == 180 and single.stat()["blocks"] == 60
        listed = kvstore_cli("--endpoint", endpoints, "--json", "ns", "ls")
        rows = {(n["tenant"], n["subtenant"]): n["blocks"] for n in json.loads(listed.stdout)}
        assert rows[(tenant, "triple")] == 180 and rows[(tenant, "default")] == 60
    finally:
        triple.close()
        single.close()


def test_a_lost_replica_is_repaired_on_read(local_cluster, tenant):
    cluster = local_cluster(3, "--replicas", "2")
    values = {f"r{i}".encode(): os.urandom(2000) for i in range(40)}
    kv = SyncClient(cluster.endpoints, tenant=tenant)
    try:
        kv.put_many(values)
        before = disk_blocks(kv)
        assert sum(before.values()) == 80
        ring = Ring(cluster.ids)
        primaries = {k: ring.primary(tenant, "default", k) for k in values}
        victim = "node1"
        lost = [k for k, node in primaries.items() if node == victim]
        assert lost
        assert delete_on(f"127.0.0.1:{cluster.ports[victim]}", tenant, lost) == len(lost)
        assert disk_blocks(kv)[victim] == before[victim] - len(lost)
        # Reads still answer from the other replica, and put the lost copies back.
        assert kv.get_many(list(values)) == list(values.values())
        kv._run(asyncio.sleep(0))  # let the repair tasks start
        for _ in range(50):
            if disk_blocks(kv) == before:
                break
            kv._run(asyncio.sleep(0.1))
        assert disk_blocks(kv) == before
        assert kv._client.repaired == len(lost)
    finally:
        kv.close()


def get_on(address: str, tenant: str, key: bytes) -> bytes | None:
    """One daemon's own copy of a block, inline (None when it has none)."""

    async def go():
        conn = Connection(address)
        try:
            request = data_pb2.GetRequest(namespace=data_pb2.Namespace(tenant=tenant, subtenant="default"), keys=[key])
            (result,) = (await conn.data.Get(request, timeout=10)).results
            return result.value if result.found else None
        finally:
            await conn.close()

    return asyncio.run(go())


def test_a_corrupt_replica_is_dropped_and_repaired_on_read(local_cluster, tenant):
    cluster = local_cluster(3, "--replicas", "2")
    key = b"precious"
    value = b"<<precious>>" + os.urandom(50_000)
    kv = SyncClient(cluster.endpoints, tenant=tenant)
    try:
        kv.put(key, value)
        victim = Ring(cluster.ids).primary(tenant, "default", key)
        address = f"127.0.0.1:{cluster.ports[victim]}"
        cluster[victim].kill9()  # so no clean copy stays in its memory tier
        path, offset = locate(cluster[victim].data_dir, value)
        flip(path, offset + 1000)
        cluster[victim].start()
        # The client reads the good replica; the victim's copy fails its checksum there, is dropped, and is rewritten.
        assert kv.get(key) == value
        for _ in range(50):
            if get_on(address, tenant, key) == value:
                break
            kv._run(asyncio.sleep(0.1))
        assert get_on(address, tenant, key) == value
        assert {s["node_id"]: s["corrupt_blocks"] for s in kv.cluster_stats()}[victim] == 1
    finally:
        kv.close()
