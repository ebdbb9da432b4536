"""TLS and mutual TLS on gRPC, with certificates made here: round trips, every
way a handshake must fail, the plaintext health port for probes, and two
daemons that reach each other over mutual TLS with the peer credential."""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore import errors
from kvstore.client import Client, SyncClient
from kvstore.harness.ports import free_port
from tests.conftest import ThreadedDaemon
from tests.security.certs import CertificateAuthority

ADMIN = "admin-token-of-the-tls-tests-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory / "ca")
    other = CertificateAuthority(directory / "other", "another CA")
    return {
        "ca": ca,
        "daemon": ca.issue("daemon"),
        "client": ca.issue("client", server=False),
        "stranger": other.issue("stranger", server=False),
        "other_ca": other,
    }


def tls_daemon(tmp_path, pki, **settings) -> ThreadedDaemon:
    return ThreadedDaemon(
        tmp_path / "data", memory=64 << 20, tls_cert=str(pki["daemon"].cert), tls_key=str(pki["daemon"].key), **settings
    )


def test_a_tls_round_trip_and_the_ways_it_fails(tmp_path, pki):
    health_port = free_port()
    d = tls_daemon(tmp_path, pki, health_listen=f"127.0.0.1:{health_port}")
    try:
        block = os.urandom(1 << 20)
        with SyncClient(d.address, tls=str(pki["ca"].path)) as c:
            c.put(b"k", block)
            assert c.get(b"k") == block
            assert c.zero_copy  # the data plane still runs beside TLS'd gRPC
        with SyncClient(d.address, tls=str(pki["ca"].path), transport="inline") as c:
            assert c.get(b"k") == block
        # Plaintext to a TLS port, or a daemon whose CA the client does not trust: no connection.
        for settings in ({}, {"tls": str(pki["other_ca"].path)}, {"tls": True}):
            with pytest.raises(errors.UnavailableError):
                with SyncClient(d.address, connect_timeout=2, timeout=3, **settings) as c:
                    c.get(b"k")
        # Probes speak plaintext to the health port, which serves nothing else.
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stats = channel.unary_unary("/kvstore.v1.Admin/ServerStats", request_serializer=bytes, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                stats(b"", timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        d.stop()


async def test_mutual_tls_wants_a_certificate_its_ca_signed(tmp_path, pki):
    d = tls_daemon(tmp_path, pki, tls_client_ca=str(pki["ca"].path))
    try:
        assert d.daemon.local is None  # a Unix socket would let in clients without a certificate
        ca = str(pki["ca"].path)
        client, stranger = pki["client"], pki["stranger"]
        async with Client(d.address, tls=ca, tls_cert=str(client.cert), tls_key=str(client.key)) as c:
            await c.put(b"k", b"mutual")
            assert await c.get(b"k") == b"mutual"
        for settings in ({}, {"tls_cert": str(stranger.cert), "tls_key": str(stranger.key)}):
            with pytest.raises(errors.UnavailableError):
                async with Client(d.address, tls=ca, connect_timeout=2, timeout=3, **settings) as c:
                    await c.get(b"k")
    finally:
        d.stop()


def test_daemons_reach_each_other_over_mutual_tls(tmp_path, pki):
    """Token sync and rebalancing dial peers with the daemon's own certificate, its CA and the peer credential."""
    ports = [free_port(), free_port()]
    peers = ",".join(f"n{i}=127.0.0.1:{p}" for i, p in enumerate(ports))
    common = dict(
        tls_client_ca=str(pki["ca"].path), auth="token", admin_token=ADMIN, peers=peers, replicas=2, local_channel=False
    )
    a = tls_daemon(tmp_path / "a", pki, listen=f"127.0.0.1:{ports[0]}", node_id="n0", **common)
    b = tls_daemon(tmp_path / "b", pki, listen=f"127.0.0.1:{ports[1]}", node_id="n1", **common)
    mtls = dict(tls=str(pki["ca"].path), tls_cert=str(pki["client"].cert), tls_key=str(pki["client"].key))
    try:
        with SyncClient(a.address, token=ADMIN, transport="inline", **mtls) as admin:
            admin.create_namespace("acme", "a")
            token = admin.create_token("acme", "a")["token"]
        # Made on n0, handed to n1 over mutual TLS before n0 answered: n1 serves it at once.
        with SyncClient(b.address, token=token, tenant="acme", subtenant="a", **mtls) as c:
            c.put(b"k", b"on both")
            assert c.get(b"k") == b"on both"
        assert b.daemon.guard.table.has_namespace(type(a.daemon.guard.table.namespaces()[0])("acme", "a"))
    finally:
        a.stop()
        b.stop()
