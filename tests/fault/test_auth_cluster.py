"""Namespaces and tokens reach every daemon of a cluster (``--auth token``,
static peers): a token made on one node works on every node at once, a
revocation too, and a daemon that was down while they changed catches up
before it serves its first call."""

from __future__ import annotations

import time

import grpc
import pytest

from kvstore import errors
from kvstore._proto.v1 import data_pb2 as pb
from kvstore.client import SyncClient
from kvstore.protocol import metadata
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.status import error_from_rpc

ADMIN = "admin-token-of-the-cluster-tests-0123456789"


def stat_on(address: str, token: str, ns=("acme", "a")):
    """Data.Stat on one daemon: None when it serves the token, else the error."""
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary("/kvstore.v1.Data/Stat", request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=None)
        try:
            stub(pb.StatRequest(namespace=pb.Namespace(tenant=ns[0], subtenant=ns[1])),
                 metadata=(metadata.bearer(token),), timeout=10)
        except grpc.RpcError as exc:
            return error_from_rpc(exc, address)
    return None


@pytest.fixture
def secured_cluster(local_cluster, monkeypatch):
    monkeypatch.setenv("KVSTORE_ADMIN_TOKEN", ADMIN)  # the daemons' admin credential, and the harness's probes
    return local_cluster(3, "--auth", "token", "--replicas", "3")


def test_tokens_and_revocations_reach_every_daemon_and_a_restarted_one_catches_up(secured_cluster):
    cluster = secured_cluster
    first, second, third = cluster.ids
    with SyncClient(cluster[first].address, token=ADMIN, transport="inline") as admin:
        admin.create_namespace("acme", "a")
        made = admin.create_token("acme", "a")
    for node in cluster.ids:  # at once: the creating daemon handed it over before it answered
        assert stat_on(cluster[node].address, made["token"]) is None, node
    with SyncClient(cluster[third].address, token=made["token"], tenant="acme", subtenant="a") as c:
        c.put(b"k", b"on every replica")  # replicas 3: every daemon takes the write with this token
        assert c.get(b"k") == b"on every replica"

    cluster[second].kill9()
    with SyncClient(cluster[first].address, token=ADMIN, transport="inline") as admin:
        admin.revoke_token(made["id"])
        admin.create_namespace("acme", "b")
        later = admin.create_token("acme")
    refused = stat_on(cluster[third].address, made["token"])
    assert isinstance(refused, errors.PermissionDeniedError) and refused.code == ErrorCode.UNAUTHENTICATED

    cluster[second].start()
    # Its very first answers already know: the revoked token is refused, the new one and namespace work.
    refused = stat_on(cluster[second].address, made["token"])
    assert isinstance(refused, errors.PermissionDeniedError) and "revoked" in refused.message
    assert stat_on(cluster[second].address, later["token"], ("acme", "b")) is None
    with SyncClient(cluster[second].address, token=later["token"], tenant="acme", subtenant="a") as c:
        assert c.get(b"k") == b"on every replica"


def test_rebalancing_passes_the_token_rules_with_the_peer_credential(local_cluster, monkeypatch):
    """Blocks written while a replica was down reach it afterwards: its peers push
    them (Data.Exists and Put on every tenant's namespace) with the peer credential,
    which no data or admin token is, and which another cluster's daemons cannot forge."""
    monkeypatch.setenv("KVSTORE_ADMIN_TOKEN", ADMIN)
    cluster = local_cluster(3, "--auth", "token", "--replicas", "3", "--rebalance-interval", "1")
    first, second, _ = cluster.ids
    with SyncClient(cluster[first].address, token=ADMIN, transport="inline") as admin:
        admin.create_namespace("acme", "a")
        token = admin.create_token("acme", "a")["token"]
    cluster[second].kill9()
    with SyncClient(cluster[first].address, token=token, tenant="acme", subtenant="a", transport="inline") as c:
        assert c.put_many({f"k{i}".encode(): b"x" * 1000 for i in range(20)}) == 20
    cluster[second].start()

    def blocks_on_second() -> int:
        with SyncClient(cluster[second].address, token=ADMIN, transport="inline") as admin:
            return admin.server_stats()["tiers"]["disk"]["blocks"]

    deadline = time.monotonic() + 30
    while blocks_on_second() < 20:
        assert time.monotonic() < deadline, "the returning replica never got the blocks it missed"
        time.sleep(0.5)
    with SyncClient(cluster[first].address, token=ADMIN, transport="inline") as admin:
        report = admin.cluster_stats()
        # (errors while the replica was down are expected; none may be an access refusal)
        assert all(node["up"] for node in report)
        for node in report:
            assert not any(word in node["rebalance"]["last_error"] for word in ("UNAUTHENTICATED", "PERMISSION")), node

    from kvstore.server.auth.tokens import peer_credential

    forged = stat_on(cluster[first].address, peer_credential("another-clusters-admin-token-000"))
    assert isinstance(forged, errors.PermissionDeniedError) and forged.code == ErrorCode.UNAUTHENTICATED
