"""Rebalancing: when members join or leave, blocks move to their new owners
in the background while every acknowledged block stays readable, and in the
end each daemon holds exactly the blocks the ring gives it."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

from kvstore._proto.v1 import data_pb2
from kvstore.client import SyncClient
from kvstore.client.transport import Connection
from kvstore.ring import Ring


def node_keys(address: str, tenant: str) -> set[bytes]:
    """The keys one daemon holds in (tenant, default), asked of that daemon alone."""

    async def scan() -> set[bytes]:
        conn = Connection(address)
        keys: set[bytes] = set()
        after = b""
        try:
            while True:
                request = data_pb2.ListRequest(
                    namespace=data_pb2.Namespace(tenant=tenant, subtenant="default"), start_after=after, limit=1000
                )
                response = await conn.data.List(request, timeout=10)
                keys.update(e.key for e in response.entries)
                if not response.truncated or not response.entries:
                    return keys
                after = response.entries[-1].key
        finally:
            await conn.close()

    return asyncio.run(scan())


def holders(cluster, tenant: str, key: bytes) -> list[str]:
    """Which daemons of ``cluster`` hold ``key`` right now, asked one by one (for failure
    messages; "node?" for one that did not answer)."""
    found = []
    for node in cluster.ids:
        try:
            if key in node_keys(f"127.0.0.1:{cluster.ports[node]}", tenant):
                found.append(node)
        except Exception:
            found.append(f"{node}?")
    return found


def expected_placement(ids: list[str], tenant: str, keys, replicas: int) -> dict[str, set[bytes]]:
    ring = Ring(ids)
    placement: dict[str, set[bytes]] = {node: set() for node in ids}
    for key in keys:
        for node in ring.owners(tenant, "default", key, replicas):
            placement[node].add(key)
    return placement


def wait_for_placement(cluster, tenant: str, keys, replicas: int, timeout: float = 90.0) -> None:
    want = expected_placement(cluster.ids, tenant, keys, replicas)
    deadline = time.monotonic() + timeout
    while True:
        dead = [n for n in cluster.ids if cluster[n].proc.poll() is not None]
        assert not dead, "".join(f"{n} exited:\n" + "".join(cluster[n].log[-30:]) for n in dead)
        try:
            have = {node: node_keys(f"127.0.0.1:{cluster.ports[node]}", tenant) for node in cluster.ids}
        except Exception as exc:  # a daemon that died shows up in the check above on the next round
            have = {"unreachable": str(exc)}
        if have == want:
            return
        if time.monotonic() > deadline:
            diff = {n: (len(have[n] - want[n]), len(want[n] - have[n])) for n in cluster.ids} if "unreachable" not in have else have
            raise AssertionError(f"placement did not converge: (extra, missing) per node {diff}")
        time.sleep(0.5)


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


class Readers:
    """A thread reading acknowledged blocks back the whole time, byte-exact."""

    def __init__(self, cluster, tenant: str, values: dict[bytes, bytes]) -> None:
        self.cluster, self.tenant, self.values = cluster, tenant, values
        self.failures: list[str] = []
        self.reads = 0
        self.phase = "start"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(3)
        kv = SyncClient(self.cluster.endpoints, tenant=self.tenant, read_failures="raise", attempt_timeout=2.0)
        try:
            keys = list(self.values)
            while not self.stop.is_set():
                sample = rng.sample(keys, 32)
                try:
                    got = kv.get_many(sample)
                except Exception as exc:
                    self.failures.append(f"get raised {exc!r}")
                    time.sleep(0.2)
                    continue
                self.reads += len(sample)
                for k, v in zip(sample, got):
                    if v != self.values[k]:
                        self.failures.append(
                            f"{k!r}: {'missing' if v is None else 'wrong bytes'} [{self.phase}; "
                            f"held by {holders(self.cluster, self.tenant, k)}; map {kv.cluster_map()}; "
                            f"order {kv._client._view.read_order(self.tenant, 'default', k)}]"
                        )
        finally:
            kv.close()

    def __enter__(self) -> "Readers":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join(60)


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
