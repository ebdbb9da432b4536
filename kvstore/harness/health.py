"""Readiness and status probes of the servers the harness runs.

A daemon is ready when it answers the standard gRPC health service
(``grpc_health.v1``, service "") as SERVING: it turns SERVING once every
service is registered and its cluster membership has started, and NOT_SERVING
when it begins to drain. ``probe`` adds what ``kvstore cluster status`` shows
(ServerStats, GetClusterMap; with ``KVSTORE_ADMIN_TOKEN`` when it is set). etcd is ready when its /health says so; a server
with neither (the bench's peers) when its TCP port accepts.

Everything goes over the wire, with the stubs of ``kvstore._proto`` and the
protocol's channel options: nothing of the SDK or the daemon is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import urllib.request
from typing import Sequence

import grpc

from kvstore._proto.v1 import admin_pb2, admin_pb2_grpc, cluster_pb2, cluster_pb2_grpc
from kvstore.protocol.metadata import bearer, channel_options
from kvstore.protocol.status import error_from_rpc

# The standard health service (grpc/health/v1/health.proto), spoken without its
# package (grpcio-health-checking is the daemon's dependency, not the SDK's): the
# request for the whole server is empty, the answer's field 1 is the status.
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = 1
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def health_status(raw: bytes) -> int:
    """The ``status`` of a serialized HealthCheckResponse (0, UNKNOWN, when absent)."""
    position = 0
    while position < len(raw):
        tag, position = _varint(raw, position)
        if tag == 0x08:  # field 1, varint
            return _varint(raw, position)[0]
        if tag & 7 == 0:
            position = _varint(raw, position)[1]
        elif tag & 7 == 2:
            length, position = _varint(raw, position)
            position += length
        else:
            return 0
    return 0


def _varint(raw: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _health_check(channel):
    return channel.unary_unary(HEALTH_CHECK, request_serializer=None, response_deserializer=None)


def grpc_serving(address: str, timeout: float = 1.0) -> bool:
    """Whether the daemon at ``address`` answers the gRPC health check as SERVING."""
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        try:
            reply = _health_check(channel)(b"", timeout=timeout)
        except grpc.RpcError:
            return False
    return health_status(reply) == SERVING


def etcd_healthy(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether the etcd at ``endpoint`` (HOST:PORT of its client URL) reports itself healthy."""
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=timeout) as reply:
            return json.loads(reply.read()).get("health") == "true"
    except (OSError, ValueError):
        return False


def wait_for_port(host: str, port: int, timeout: float, process=None) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds; False at
    once if ``process`` (a ``ServerProcess``, the one that should listen there) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.running:
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def describe_error(exc: BaseException, address: str = "") -> str:
    """One line for a failed call: a gRPC failure as the kvstore error it stands for."""
    if isinstance(exc, grpc.RpcError):
        error = error_from_rpc(exc, address)
        return f"{type(error).__name__}: {error}"
    return f"{type(exc).__name__}: {exc}"


async def probe(address: str, timeout: float) -> dict:
    """Health, and when SERVING the daemon's statistics and cluster map, as one dict:
    ``health`` "up" or "down", ``error`` (None, or what failed), then id, uptime,
    tiers, data plane, rebalancing, epoch, members, replicas and write quorum."""
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        try:
            health = health_status(await _health_check(channel)(b"", timeout=timeout))
        except grpc.RpcError as exc:
            return {"health": "down", "error": describe_error(exc, address)}
        if health != SERVING:
            name = STATUS_NAMES.get(health, str(health))
            return {"health": "down", "error": f"health check: {name}"}
        out: dict = {"health": "up", "error": None}
        # Statistics are the operator's: under --auth token they need the admin token.
        admin_token = os.environ.get("KVSTORE_ADMIN_TOKEN")
        credential = (bearer(admin_token),) if admin_token else ()
        stats, cmap = await asyncio.gather(
            admin_pb2_grpc.AdminStub(channel).ServerStats(admin_pb2.ServerStatsRequest(), timeout=timeout, metadata=credential),
            cluster_pb2_grpc.ClusterStub(channel).GetClusterMap(
                cluster_pb2.GetClusterMapRequest(), timeout=timeout, metadata=credential
            ),
            return_exceptions=True,
        )
    if isinstance(stats, BaseException):
        out["error"] = f"ServerStats: {describe_error(stats, address)}"
    else:
        r = stats.rebalance
        out.update(
            id=stats.node_id,
            uptime_seconds=stats.uptime_seconds,
            membership=stats.membership,
            tiers={t.name: {"blocks": t.blocks, "bytes": t.bytes, "capacity_bytes": t.capacity_bytes} for t in stats.tiers},
            data_plane={"enabled": stats.data_plane, "ucx_tls": stats.ucx_tls, "clients": stats.data_plane_clients},
            rebalance={
                "state": r.state or "idle",
                "epoch": r.epoch,
                "keys_scanned": r.keys_scanned,
                "keys_total": r.keys_total,
                "keys_copied": r.keys_copied,
                "bytes_copied": r.bytes_copied,
                "keys_dropped": r.keys_dropped,
                "errors": r.errors,
                "last_error": r.last_error,
            },
        )
    if isinstance(cmap, BaseException):
        out["error"] = f"GetClusterMap: {describe_error(cmap, address)}"
    else:
        out.update(
            epoch=cmap.epoch,
            members=[n.node_id for n in cmap.nodes],
            replicas=cmap.replicas,
            write_quorum=cmap.write_quorum,
        )
    return out


def probe_all(addresses: Sequence[str], timeout: float) -> list[dict]:
    """``probe`` of every address at once (from code that runs no event loop)."""

    async def every() -> list[dict]:
        return list(await asyncio.gather(*(probe(a, timeout) for a in addresses)))

    return asyncio.run(every())
