"""The daemon as operators see it: health, reflection, metrics, stats, config."""

import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvstore.client import Client, SyncClient
from tests.conftest import ThreadedDaemon


async def test_health_service(daemon):
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvstore.v1.Data", "kvstore.v1.Admin", "kvstore.v1.Cluster"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(daemon):
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"kvstore.v1.Data", "kvstore.v1.Cluster", "kvstore.v1.Admin", "grpc.health.v1.Health"} <= names


async def test_cluster_of_one_and_hello(daemon, tenant):
    from kvstore._proto.v1 import cluster_pb2, cluster_pb2_grpc

    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = cluster_pb2_grpc.ClusterStub(channel)
        cmap = await stub.GetClusterMap(cluster_pb2.GetClusterMapRequest())
        hello = await stub.Hello(cluster_pb2.HelloRequest(client_id="t"))
    assert cmap.epoch >= 1 and [n.address for n in cmap.nodes] == [daemon.address]
    assert hello.node_id == cmap.nodes[0].node_id and hello.node_id.endswith(str(daemon.daemon.port))
    assert hello.max_value_bytes == daemon.config.max_value_size and hello.max_key_bytes == 1024


def test_metrics_endpoint_and_stats(tmp_path, tenant):
    d = ThreadedDaemon(tmp_path, memory=16 << 20, metrics_port=0)
    try:
        with SyncClient(d.address, tenant=tenant) as kv:
            kv.put_many([(b"k%d" % i, b"x" * 100) for i in range(10)])
            assert kv.get(b"k1") == b"x" * 100
            assert kv.get(b"none") is None
            stats = kv.server_stats()
        text = urllib.request.urlopen(f"http://127.0.0.1:{d.daemon.metrics_port}/metrics", timeout=5).read().decode()
        assert 'kvstore_requests_total{code="OK",method="Data.Put"} 1.0' in text
        assert 'kvstore_get_blocks_total{result="hit"} 1.0' in text
        assert 'kvstore_get_blocks_total{result="miss"} 1.0' in text
        assert 'kvstore_tier_blocks{tier="disk"} 10.0' in text
        assert "kvstore_corrupt_blocks 0.0" in text
        memory = stats["tiers"]["memory"]
        assert memory["resident_bytes"] <= 16 << 20  # prefaulted in the background after start
        assert {k: memory[k] for k in ("blocks", "bytes", "capacity_bytes")} == {
            "blocks": 10, "bytes": 1000, "capacity_bytes": 16 << 20
        }
        assert stats["tiers"]["disk"]["blocks"] == 10 and stats["tiers"]["disk"]["bytes"] == 1000
        assert stats["namespaces"] == 1 and stats["uptime_seconds"] > 0 and stats["requests"] >= 4
    finally:
        d.stop()


async def test_restart_in_process_keeps_everything(tmp_path, tenant):
    d = ThreadedDaemon(tmp_path, memory=16 << 20)
    async with Client(d.address, tenant=tenant) as kv:
        await kv.put_many([(b"k%d" % i, b"v%d" % i) for i in range(100)])
        await kv.put(b"mem", b"written back on stop", durability="memory")
    d.stop()
    d = ThreadedDaemon(tmp_path, memory=16 << 20)
    try:
        async with Client(d.address, tenant=tenant) as kv:
            assert await kv.get_many([b"k%d" % i for i in range(100)]) == [b"v%d" % i for i in range(100)]
            assert await kv.get(b"mem") == b"written back on stop"
            assert (await kv.stat())["blocks"] == 101
    finally:
        d.stop()
