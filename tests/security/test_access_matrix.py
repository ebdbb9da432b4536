"""The namespace is an access boundary (``--auth token``): every RPC, over gRPC
and (for Data) the local channel, under every kind of wrong credential.

One daemon in token mode holds tenants t1 (subtenants a, b) and t2 (a). Each
cell of the matrix sends one real request with one credential and checks the
precise outcome: UNAUTHENTICATED for no, malformed, unknown, wrong, revoked or
forged credentials; PERMISSION_DENIED for another tenant's token, a read-only
token on writes, a data token on the Admin service and the admin token on
data; OK where the rules allow it. A refused read says the same whether or not
its key exists, and no refused write changes anything.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from kvstore import errors
from kvstore._proto.v1 import admin_pb2, cluster_pb2
from kvstore._proto.v1 import data_pb2 as pb
from kvstore.checksum import checksum
from kvstore.client import SyncClient
from kvstore.client.local import LocalChannel
from kvstore.protocol import metadata
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.local_channel import NO_EPOCH
from kvstore.protocol.status import error_from_rpc
from kvstore.server.auth import tokens
from kvstore.server.auth.tokens import peer_credential
from tests.conftest import ThreadedDaemon

ADMIN = "admin-token-for-the-matrix-0123456789"
KEY, MISSING, VALUE = b"present", b"absent", b"the bytes of t1/a"
T1A = pb.Namespace(tenant="t1", subtenant="a")
OK = "OK"
UNAUTH, DENIED = ErrorCode.UNAUTHENTICATED, ErrorCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    d = ThreadedDaemon(tmp_path_factory.mktemp("secured"), memory=64 << 20, auth="token", admin_token=ADMIN)
    with SyncClient(d.address, token=ADMIN, transport="inline") as admin:
        for tenant, subtenant in (("t1", "a"), ("t1", "b"), ("t2", "a"), ("t1", "victim")):
            assert admin.create_namespace(tenant, subtenant) is True
        assert admin.create_namespace("t1", "a") is False
        made = {
            "t1": admin.create_token("t1"),
            "t1a_ro": admin.create_token("t1", "a", read_only=True),
            "t2": admin.create_token("t2"),
            "revoked": admin.create_token("t1"),
            "throwaway": admin.create_token("t2"),
        }
        admin.revoke_token(made["revoked"]["id"])
    issued = {name: info["token"] for name, info in made.items()}
    with SyncClient(d.address, token=issued["t1"], tenant="t1", subtenant="a", transport="inline") as writer:
        writer.put(KEY, VALUE)
    d.tokens = issued
    d.ids = {name: info["id"] for name, info in made.items()}
    yield d
    d.stop()


def requests(d) -> dict[str, object]:
    """One real request per RPC, each aimed at t1/a (or t1's throwaway objects)."""
    return {
        "Data.Put": pb.PutRequest(
            namespace=T1A, blocks=[pb.BlockWrite(key=KEY, value=b"overwritten", length=11, checksum=checksum(b"overwritten"))]
        ),
        "Data.Get": pb.GetRequest(namespace=T1A, keys=[KEY]),
        "Data.Exists": pb.KeysRequest(namespace=T1A, keys=[KEY]),
        "Data.LookupPrefix": pb.KeysRequest(namespace=T1A, keys=[KEY]),
        "Data.Delete": pb.KeysRequest(namespace=T1A, keys=[KEY]),
        "Data.List": pb.ListRequest(namespace=T1A),
        "Data.Stat": pb.StatRequest(namespace=T1A),
        "Cluster.GetClusterMap": cluster_pb2.GetClusterMapRequest(),
        "Cluster.Hello": cluster_pb2.HelloRequest(client_id="matrix"),
        "Admin.ListNamespaces": admin_pb2.ListNamespacesRequest(),
        "Admin.DropNamespace": admin_pb2.DropNamespaceRequest(namespace=pb.Namespace(tenant="t1", subtenant="victim")),
        "Admin.ServerStats": admin_pb2.ServerStatsRequest(),
        "Admin.SetNamespacePolicy": admin_pb2.SetNamespacePolicyRequest(
            policy=cluster_pb2.NamespacePolicy(namespace=T1A, replicas=1)
        ),
        "Admin.GetNamespacePolicy": admin_pb2.GetNamespacePolicyRequest(namespace=T1A),
        "Admin.CreateNamespace": admin_pb2.CreateNamespaceRequest(namespace=pb.Namespace(tenant="t1", subtenant="new")),
        "Admin.CreateToken": admin_pb2.CreateTokenRequest(tenant="t1"),
        "Admin.ListTokens": admin_pb2.ListTokensRequest(),
        "Admin.RevokeToken": admin_pb2.RevokeTokenRequest(id=d.ids["throwaway"]),
        "Admin.SyncAuth": admin_pb2.SyncAuthRequest(),
    }


METHODS = list(requests(type("D", (), {"ids": {"throwaway": "0" * 12}})()))
WRITES = {"Data.Put", "Data.Delete"}
# Calls whose success would change what later cells see: only their refusals are sent.
CHANGES = WRITES | {"Admin.DropNamespace", "Admin.RevokeToken", "Admin.CreateNamespace", "Admin.CreateToken",
                    "Admin.SetNamespacePolicy"}


def secret(token: str) -> str:
    return tokens.parse(token).secret


def wrong_secret(token: str) -> str:
    presented = tokens.parse(token)
    changed = ("A" if presented.secret[0] != "A" else "B") + presented.secret[1:]
    return f"kvs_{presented.id}_{changed}"


def credentials(d) -> dict[str, str | None]:
    """Name -> the authorization value (None: no metadata at all)."""
    t = d.tokens
    return {
        "none": None,
        "not bearer": "Basic dXNlcjpwYXNz",
        "malformed": "Bearer kvs_nothing",
        "unknown": "Bearer kvs_0123456789ab_" + "A" * 43,
        "wrong secret": "Bearer " + wrong_secret(t["t1"]),
        "revoked": "Bearer " + t["revoked"],
        "forged peer": "Bearer " + peer_credential("not-the-admin-token-of-this-cluster"),
        "other tenant": "Bearer " + t["t2"],
        "read-only": "Bearer " + t["t1a_ro"],
        "data token": "Bearer " + t["t1"],
        "admin": "Bearer " + ADMIN,
    }


def expected(method: str, credential: str):
    if credential in ("none", "not bearer", "malformed", "unknown", "wrong secret", "revoked", "forged peer"):
        return UNAUTH
    service = method.split(".")[0]
    if service == "Cluster":
        return OK
    if service == "Admin":
        return OK if credential == "admin" and method != "Admin.SyncAuth" else DENIED
    if credential in ("other tenant", "admin"):
        return DENIED
    if credential == "read-only":
        return DENIED if method in WRITES else OK
    return OK  # the t1 token on t1/a


CELLS = [
    (method, credential)
    for method in METHODS
    for credential in ("none", "not bearer", "malformed", "unknown", "wrong secret", "revoked", "forged peer",
                       "other tenant", "read-only", "data token", "admin")
    if not (method in CHANGES and expected(method, credential) == OK)
]


def call_grpc(d, method: str, request, authorization: str | None):
    service, name = method.split(".")
    with grpc.insecure_channel(d.address) as channel:
        stub = channel.unary_unary(
            f"/kvstore.v1.{service}/{name}", request_serializer=lambda m: m.SerializeToString(), response_deserializer=None
        )
        md = ((metadata.AUTHORIZATION, authorization),) if authorization is not None else ()
        try:
            stub(request, metadata=md, timeout=10)
        except grpc.RpcError as exc:
            return error_from_rpc(exc, d.address)
    return None


def call_local(d, method: str, request, authorization: str | None):
    hello = call_grpc_response(d, cluster_pb2.HelloRequest(client_id="matrix"))
    assert hello.local_socket, "the daemon announces no local channel: the matrix would not cover it"

    async def go():
        channel = await LocalChannel.open(hello.local_socket, d.address, timeout=5, authorization=authorization or "")
        try:
            await channel.call(method.split(".")[1], request, NO_EPOCH, 10)
        except errors.KVStoreError as exc:
            return exc
        finally:
            channel.close()
        return None

    return asyncio.run(go())


def call_grpc_response(d, request):
    with grpc.insecure_channel(d.address) as channel:
        stub = channel.unary_unary(
            "/kvstore.v1.Cluster/Hello", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=cluster_pb2.HelloResponse.FromString,
        )
        return stub(request, metadata=(metadata.bearer(ADMIN),), timeout=10)


def outcome(error) -> str:
    if error is None:
        return OK
    assert isinstance(error, errors.PermissionDeniedError), f"not an access refusal: {error!r}"
    return error.code


@pytest.mark.parametrize("method, credential", CELLS, ids=[f"{m}-{c}" for m, c in CELLS])
def test_grpc_cell(secured, method, credential):
    authorization = credentials(secured)[credential]
    error = call_grpc(secured, method, requests(secured)[method], authorization)
    assert outcome(error) == expected(method, credential), error
    if error is not None:
        assert secret(secured.tokens["t1"]) not in error.message


DATA_CELLS = [(m, c) for m, c in CELLS if m.startswith("Data.")]


@pytest.mark.parametrize("method, credential", DATA_CELLS, ids=[f"{m}-{c}" for m, c in DATA_CELLS])
def test_local_channel_cell(secured, method, credential):
    authorization = credentials(secured)[credential]
    error = call_local(secured, method, requests(secured)[method], authorization)
    assert outcome(error) == expected(method, credential), error


@pytest.mark.parametrize("transport", [call_grpc, call_local], ids=["grpc", "local"])
@pytest.mark.parametrize("credential", ["other tenant", "admin", "none", "wrong secret"])
def test_a_refused_read_does_not_say_whether_the_key_exists(secured, transport, credential):
    authorization = credentials(secured)[credential]
    for method in ("Data.Get", "Data.Exists", "Data.LookupPrefix"):
        kind = pb.GetRequest if method == "Data.Get" else pb.KeysRequest
        present = transport(secured, method, kind(namespace=T1A, keys=[KEY]), authorization)
        absent = transport(secured, method, kind(namespace=T1A, keys=[MISSING]), authorization)
        assert present is not None and absent is not None
        assert (present.code, present.message) == (absent.code, absent.message)


def test_refused_writes_changed_nothing(secured):
    """After every cell ran (this module's order), t1/a still holds its one block, unchanged."""
    with SyncClient(secured.address, token=secured.tokens["t1"], tenant="t1", subtenant="a", transport="inline") as c:
        assert c.get(KEY) == VALUE
        assert c.list() == [(KEY, len(VALUE))]
    with SyncClient(secured.address, token=ADMIN, transport="inline") as admin:
        names = {(n["tenant"], n["subtenant"]) for n in admin.namespaces()}
        assert ("t1", "victim") in names and ("t1", "new") not in names
        assert secured.ids["throwaway"] in {t["id"] for t in admin.tokens()}


def test_a_data_token_sees_only_its_tenants_policies_in_the_map(secured):
    for tenant in ("t1", "t2"):
        with SyncClient(secured.address, token=ADMIN, tenant=tenant, subtenant="a", transport="inline") as admin:
            admin.set_replication(1, 1)

    def policies(token: str) -> set[str]:
        with grpc.insecure_channel(secured.address) as channel:
            stub = channel.unary_unary(
                "/kvstore.v1.Cluster/GetClusterMap", request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=cluster_pb2.ClusterMap.FromString,
            )
            cluster_map = stub(cluster_pb2.GetClusterMapRequest(), metadata=(metadata.bearer(token),), timeout=10)
        return {p.namespace.tenant for p in cluster_map.policies}

    assert policies(ADMIN) == {"t1", "t2"}
    assert policies(secured.tokens["t1"]) == {"t1"}
    assert policies(secured.tokens["t2"]) == {"t2"}


def test_tokens_are_kept_as_hashes_only(secured):
    table = (Path(secured.config.data_dir) / "auth.json").read_text()
    for token in secured.tokens.values():
        assert secret(token) not in table
    entries = json.loads(table)["entries"]
    assert {e["value"]["tenant"] for k, e in entries.items() if k.startswith("token/") and e["value"]} == {"t1", "t2"}
    with SyncClient(secured.address, token=ADMIN, transport="inline") as admin:
        listed = admin.tokens()
    assert listed and all("token" not in t and "hash" not in t for t in listed)


def test_refusals_are_counted_by_method_and_code(secured):
    call_grpc(secured, "Data.Stat", pb.StatRequest(namespace=T1A), None)
    samples = {
        (s.labels["method"], s.labels["code"]): s.value
        for metric in secured.daemon.metrics.auth_denied.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }
    assert samples[("Data.Stat", "UNAUTHENTICATED")] >= 1
    assert samples[("Admin.ServerStats", "PERMISSION_DENIED")] >= 1
