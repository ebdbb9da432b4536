"""A cluster of subprocess daemons under faults: kill -9 loops under load,
a daemon frozen mid-batch, writes routed with a stale map.

Every acknowledged block must stay readable, byte-exact, throughout. The CI
form runs a few cycles; ``--runslow`` runs the long soak.
"""

from __future__ import annotations

import os
import random
import signal
import time

import grpc
import pytest

from kvstore._proto.v1 import data_pb2, errors_pb2
from kvstore.client import Deadline
from kvstore.client.connection import Connection
from kvstore.errors import WrongNodeError
from kvstore.protocol.status import error_from_rpc as translate
from kvstore.ring import Ring
from tests.fault.support import Workload, cluster_client


def kill_loop(local_cluster, tenant: str, cycles: int, interval: float) -> None:
    cluster = local_cluster(3, "--replicas", "2")
    rng = random.Random(7)
    with Workload(cluster, tenant, writers=2, seed=100) as load:
        time.sleep(interval)
        for _ in range(cycles):
            victim = cluster[rng.choice(cluster.ids)]
            victim.kill9()
            time.sleep(interval)
            victim.start()
            time.sleep(interval)
    print(
        f"{cycles} kill -9 cycles: {len(load.acked)} blocks acknowledged, {load.reads} reads verified, "
        f"{load.put_errors} batches not acknowledged, {len(load.failures)} failures"
    )
    assert not load.failures, load.failures[:10]
    assert len(load.acked) >= 8 * cycles, "the workload acknowledged too little to prove anything"
    assert load.reads > 0
    # Every acknowledged block, read back by a new client, byte for byte.
    kv = cluster_client(cluster, tenant)
    try:
        keys = list(load.acked)
        got = kv.get_many(keys)
        lost = [k for k, v in zip(keys, got) if v != load.acked[k]]
        assert not lost, f"{len(lost)} of {len(keys)} acknowledged blocks lost or wrong, e.g. {lost[:5]}"
    finally:
        kv.close()


def test_kill9_loop_under_load_loses_nothing(local_cluster, tenant):
    kill_loop(local_cluster, tenant, cycles=3, interval=1.5)


@pytest.mark.slow
def test_kill9_loop_under_load_loses_nothing_soak(local_cluster, tenant):
    kill_loop(local_cluster, tenant, cycles=25, interval=2.0)


def test_frozen_daemon_mid_batch_completes_on_the_other_replica(local_cluster, tenant):
    cluster = local_cluster(3, "--replicas", "2")
    kv = cluster_client(cluster, tenant)
    try:
        values = {f"k{i}".encode(): os.urandom(32 << 10) for i in range(64)}
        kv.put_many(values)
        ring = Ring(cluster.ids)
        keys = list(values)
        # Freeze the node that owns the most of the batch.
        primaries = [ring.primary(tenant, "default", k) for k in keys]
        frozen = max(cluster.ids, key=primaries.count)
        cluster[frozen].proc.send_signal(signal.SIGSTOP)
        try:
            deadline = Deadline(total=10.0, attempt=1.0)
            started = time.monotonic()
            got = kv.get_many(keys, deadline=deadline)
            elapsed = time.monotonic() - started
            assert got == [values[k] for k in keys]
            assert elapsed < deadline.total
            # Writes, too, land on the live replicas within the deadline.
            more = {f"m{i}".encode(): os.urandom(4096) for i in range(32)}
            started = time.monotonic()
            assert kv.put_many(more, deadline=deadline) == len(more)
            assert time.monotonic() - started < deadline.total
            assert kv.get_many(list(more), deadline=deadline) == list(more.values())
        finally:
            cluster[frozen].proc.send_signal(signal.SIGCONT)
        # Thawed, the cluster serves everything, and the frozen node got its copies back by repair or rebalance.
        assert kv.get_many(keys) == [values[k] for k in keys]
        assert kv.get_many(list(more)) == list(more.values())
    finally:
        kv.close()


def test_write_routed_with_a_stale_map_is_redirected(local_cluster, tenant):
    cluster = local_cluster(3, "--replicas", "1")
    ring = Ring(cluster.ids)
    key = next(k for k in (f"key{i}".encode() for i in range(1000)) if ring.primary(tenant, "default", k) == "node1")
    wrong = cluster["node2"]
    request = data_pb2.PutRequest(
        namespace=data_pb2.Namespace(tenant=tenant, subtenant="default"),
        blocks=[data_pb2.BlockWrite(key=key, value=b"v", length=1, checksum=__import__("xxhash").xxh3_64_intdigest(b"v"))],
    )

    async def put(conn, epoch: str):
        try:
            await conn.data.Put(request, timeout=5, metadata=(("kvstore-epoch", epoch),))
        except grpc.RpcError as exc:
            return translate(exc, conn.endpoint)
        return None

    import asyncio

    async def scenario():
        conn = Connection(f"127.0.0.1:{wrong.port}")
        try:
            error = await put(conn, "12345")  # not the daemon's epoch, and node2 does not own the key
            assert isinstance(error, WrongNodeError), error
            assert error.code == errors_pb2.ErrorCode.Name(errors_pb2.WRONG_NODE)
            assert "node1" in error.message and error.index == 0
        finally:
            await conn.close()

    asyncio.run(scenario())
    # The SDK, routing by the map, puts it where it belongs.
    kv = cluster_client(cluster, tenant)
    try:
        kv.put(key, b"v")
        assert kv.get(key) == b"v"
        stats = {s["node_id"]: s for s in kv.cluster_stats()}
        assert stats["node1"]["tiers"]["disk"]["blocks"] == 1
        assert stats["node2"]["tiers"]["disk"]["blocks"] == 0
    finally:
        kv.close()
