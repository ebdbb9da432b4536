"""Tokens from the user's side (``--auth token``): the SDK and CLI carry them on
every path (gRPC, the local channel, the zero-copy data plane), an admin
creates, lists and revokes them at run time, a revoked one stops working at
once, they survive a restart, and a data-plane session serves only the
credential that opened it."""

from __future__ import annotations

import json
import logging
import os
import time

import grpc
import pytest

from kvstore import errors
from kvstore._proto.v1 import data_pb2 as pb
from kvstore.client import Client, SyncClient
from kvstore.harness.ports import free_port
from kvstore.protocol import metadata
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.status import error_from_rpc
from kvstore.server.config import ServerConfig
from tests.conftest import ThreadedDaemon, kvstore_cli

ADMIN = "admin-token-of-the-sdk-tests-0123456789"


@pytest.fixture
def secured(tmp_path):
    d = ThreadedDaemon(tmp_path / "data", memory=64 << 20, auth="token", admin_token=ADMIN)
    yield d
    d.stop()


def admin_client(d) -> SyncClient:
    return SyncClient(d.address, token=ADMIN, transport="inline")


def test_a_token_carries_every_path_of_the_sdk(secured):
    with admin_client(secured) as admin:
        admin.create_namespace("acme", "llama")
        token = admin.create_token("acme", "llama")["token"]
    block = os.urandom(256 << 10)
    # auto: the local channel and the zero-copy data plane; inline: gRPC with values inside.
    for transport in ("auto", "inline"):
        with SyncClient(secured.address, token=token, tenant="acme", subtenant="llama", transport=transport) as c:
            c.put(b"k-" + transport.encode(), block)
            assert c.get(b"k-" + transport.encode()) == block
            assert c.exists([b"k-auto", b"nope"]) == [True, False]
            if transport == "auto":
                assert c.zero_copy
                region = c.allocate(1 << 20)
                region.buffer[: len(block)] = block
                assert c.put_from([b"from-region"], region, [0], [len(block)]) == 1
                assert c.get_into([b"from-region"], region, [len(block)], [len(block)]) == [len(block)]
                assert bytes(region.buffer[len(block) : 2 * len(block)]) == block
    assert secured.daemon.local is not None and secured.daemon.local.connections is not None


async def test_the_async_client_and_kvstore_token(secured, monkeypatch):
    with admin_client(secured) as admin:
        admin.create_namespace("acme", "a")
        token = admin.create_token("acme")["token"]
    monkeypatch.setenv("KVSTORE_TOKEN", token)
    async with Client(secured.address, tenant="acme", subtenant="a") as c:
        await c.put(b"k", b"v")
        assert await c.get(b"k") == b"v"
    monkeypatch.delenv("KVSTORE_TOKEN")
    with pytest.raises(errors.PermissionDeniedError) as caught:
        async with Client(secured.address, tenant="acme", subtenant="a") as c:
            await c.get(b"k")
    assert caught.value.code == ErrorCode.UNAUTHENTICATED


def test_revoking_a_token_stops_it_at_once_on_a_connected_client(secured):
    with admin_client(secured) as admin:
        admin.create_namespace("acme", "a")
        made = admin.create_token("acme", "a")
        with SyncClient(secured.address, token=made["token"], tenant="acme", subtenant="a") as c:
            c.put(b"k", b"v")
            assert c.get(b"k") == b"v"  # verified once, then remembered
            admin.revoke_token(made["id"])
            for call in (lambda: c.get(b"k"), lambda: c.put(b"k", b"w"), lambda: c.exists([b"k"])):
                with pytest.raises(errors.PermissionDeniedError) as caught:
                    call()
                assert caught.value.code == ErrorCode.UNAUTHENTICATED
                assert "revoked" in caught.value.message
        assert made["id"] not in {t["id"] for t in admin.tokens()}
        with pytest.raises(errors.InvalidArgumentError) as caught:
            admin.revoke_token(made["id"])
        assert caught.value.code == ErrorCode.UNKNOWN_TOKEN


def test_namespaces_and_tokens_survive_a_restart(tmp_path):
    d = ThreadedDaemon(tmp_path / "data", memory=64 << 20, auth="token", admin_token=ADMIN)
    try:
        with admin_client(d) as admin:
            admin.create_namespace("acme", "a")
            kept = admin.create_token("acme", "a")
            gone = admin.create_token("acme", "a")
            admin.revoke_token(gone["id"])
        with SyncClient(d.address, token=kept["token"], tenant="acme", subtenant="a", transport="inline") as c:
            c.put(b"k", b"v")
    finally:
        d.stop()
    mode = os.stat(tmp_path / "data" / "auth.json").st_mode & 0o777
    assert mode == 0o600, oct(mode)
    d = ThreadedDaemon(tmp_path / "data", memory=64 << 20, auth="token", admin_token=ADMIN)
    try:
        with SyncClient(d.address, token=kept["token"], tenant="acme", subtenant="a", transport="inline") as c:
            assert c.get(b"k") == b"v"
        with pytest.raises(errors.PermissionDeniedError, match="revoked"):
            with SyncClient(d.address, token=gone["token"], tenant="acme", subtenant="a", transport="inline") as c:
                c.get(b"k")
    finally:
        d.stop()


def test_a_data_plane_session_serves_only_the_credential_that_opened_it(secured):
    with admin_client(secured) as admin:
        admin.create_namespace("acme", "a")
        owner, other = admin.create_token("acme")["token"], admin.create_token("acme")["token"]
    with SyncClient(secured.address, token=owner, tenant="acme", subtenant="a", transport="ucx") as c:
        region = c.allocate(1 << 20)
        region.buffer[:5] = b"owned"
        c.put_from([b"k"], region, [0], [5])
        conn = next(iter(c._client._nodes.connections.values()))
        session = conn.hello.session
        request = pb.GetRequest(
            namespace=pb.Namespace(tenant="acme", subtenant="a"), keys=[b"k"], session=session,
            region=region.wire(),  # the owner's real region and rkey: only the session check stands in the way
            slots=[pb.RemoteSlot(address=region.address + 100, capacity=5)],
        )
        with grpc.insecure_channel(secured.address) as channel:
            stub = channel.unary_unary("/kvstore.v1.Data/Get", request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                stub(request, metadata=(metadata.bearer(other),), timeout=10)
        error = error_from_rpc(caught.value)
        assert isinstance(error, errors.SessionLostError) and error.code == ErrorCode.UNKNOWN_CLIENT
        assert bytes(region.buffer[100:105]) != b"owned"  # nothing was written into the owner's memory
        # ... and the owner's session is untouched.
        assert c.get_into([b"k"], region, [200], [5]) == [5]
        assert bytes(region.buffer[200:205]) == b"owned"


def test_refusals_are_logged_by_token_id_without_the_secret(secured, caplog):
    with admin_client(secured) as admin:
        admin.create_namespace("acme", "a")
        made = admin.create_token("acme")
    secret = made["token"].split("_", 2)[2]
    wrong = f"kvs_{made['id']}_{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"
    with caplog.at_level(logging.WARNING, logger="kvstore.server.auth"):
        for token in (wrong, made["token"]):
            with pytest.raises(errors.PermissionDeniedError):
                with SyncClient(secured.address, token=token, tenant="other", subtenant="a", transport="inline") as c:
                    c.get(b"k")
    text = caplog.text
    assert made["id"] in text and "wrong secret" in text and "may not use namespace other/a" in text
    assert secret not in text and secret[1:] not in text


def test_open_mode_has_no_tokens_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kvstore.server"):
        d = ThreadedDaemon(tmp_path / "data", memory=64 << 20)
    try:
        assert "UNAUTHENTICATED: --auth open" in caplog.text
        with SyncClient(d.address, transport="inline") as c:
            with pytest.raises(errors.InvalidArgumentError) as caught:
                c.create_token("acme")
            assert caught.value.code == ErrorCode.AUTH_OPEN
            assert c.create_namespace("acme", "a") is True  # listed before its first block
            assert {"tenant": "acme", "subtenant": "a", "blocks": 0, "bytes": 0} in c.namespaces()
    finally:
        d.stop()


@pytest.mark.parametrize(
    "settings, complaint",
    [
        ({"auth": "token"}, "auth token needs the admin credential"),
        ({"auth": "token", "admin_token": "short"}, "at least 16"),
        ({"auth": "token", "admin_token": "kvs_" + "x" * 40}, "not starting with"),
        ({"auth": "tokens"}, "is not one of"),
        ({"tls_cert": "/etc/hostname"}, "give both"),
    ],
)
def test_security_settings_are_checked_at_load(settings, complaint):
    with pytest.raises(errors.ConfigError, match=complaint):
        ServerConfig(**settings)


def test_the_admin_token_comes_from_a_file_or_the_environment(tmp_path):
    path = tmp_path / "admin"
    path.write_text(ADMIN + "\n")
    assert ServerConfig.load({"auth": "token", "admin_token_file": str(path)}, environ={}).admin_token == ADMIN
    assert ServerConfig.load({"auth": "token"}, environ={"KVSTORE_ADMIN_TOKEN": ADMIN}).admin_token == ADMIN
    assert ADMIN not in repr(ServerConfig(auth="token", admin_token=ADMIN))


def test_the_cli_bootstraps_a_tenant(secured):
    e = ("-e", secured.address)
    admin = {"KVSTORE_ADMIN_TOKEN": ADMIN}
    made = kvstore_cli(*e, "--tenant", "acme", "--subtenant", "a", "ns", "create", env=admin)
    assert made.returncode == 0 and b"acme/a: created" in made.stdout, made.stderr
    created = kvstore_cli(*e, "--json", "token", "create", "--tenant", "acme", "--subtenant", "a", "--read-only", env=admin)
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    assert info["token"].startswith(f"kvs_{info['id']}_") and info["read_only"]
    listed = kvstore_cli(*e, "token", "ls", env=admin)
    assert info["id"] in listed.stdout.decode() and info["token"] not in listed.stdout.decode()
    writer = kvstore_cli(*e, "--admin-token", ADMIN, "--json", "token", "create", "--tenant", "acme")
    rw = json.loads(writer.stdout)["token"]
    assert kvstore_cli(*e, "--token", rw, "--tenant", "acme", "--subtenant", "a", "put", "k", "-", input=b"v").returncode == 0
    read = kvstore_cli(*e, "--tenant", "acme", "--subtenant", "a", "get", "k", env={"KVSTORE_TOKEN": info["token"]})
    assert read.returncode == 0 and read.stdout == b"v"
    refused = kvstore_cli(*e, "--token", info["token"], "--tenant", "acme", "--subtenant", "a", "put", "k", "-", input=b"w")
    assert refused.returncode == 2 and b"may only read" in refused.stderr
    assert kvstore_cli(*e, "--json", "ns", "ls", env=admin).returncode == 0
    assert b'"tenant": "acme"' in kvstore_cli(*e, "--json", "ns", "ls", env=admin).stdout
    revoked = kvstore_cli(*e, "token", "revoke", info["id"], env=admin)
    assert revoked.returncode == 0, revoked.stderr
    again = kvstore_cli(*e, "--tenant", "acme", "--subtenant", "a", "get", "k", env={"KVSTORE_TOKEN": info["token"]})
    assert again.returncode == 2 and b"revoked" in again.stderr
    dropped = kvstore_cli(*e, "--tenant", "acme", "--subtenant", "a", "ns", "drop", env=admin)
    assert dropped.returncode == 0 and b"1 blocks" in dropped.stdout, dropped.stderr
    gone = kvstore_cli(*e, "--token", rw, "--tenant", "acme", "--subtenant", "a", "get", "k")
    assert gone.returncode == 2 and b"does not exist" in gone.stderr


def test_a_token_made_as_a_member_comes_back_works_there_at_once(tmp_path):
    """The daemon that creates a token hands it to every member before answering,
    also to one whose channel is still in reconnect backoff because it was down a
    moment ago (a fail-fast call there left the token unknown on a daemon that was up)."""
    ports = [free_port(), free_port()]
    peers = ",".join(f"n{i}=127.0.0.1:{p}" for i, p in enumerate(ports))
    common = dict(auth="token", admin_token=ADMIN, peers=peers, replicas=2, local_channel=False, memory=64 << 20)
    a = ThreadedDaemon(tmp_path / "a", listen=f"127.0.0.1:{ports[0]}", node_id="n0", **common)
    try:
        with admin_client(a) as admin:
            admin.create_namespace("acme", "a")
            for _ in range(2):
                # n1 down for 2 s while n0 keeps trying: n0's reconnect backoff grows to its 1 s cap.
                until = time.monotonic() + 2.0
                while time.monotonic() < until:
                    assert a._call(a.daemon.auth_sync.exchange()) == 0, "n1 is down: nobody answers"
                    time.sleep(0.05)
                b = ThreadedDaemon(tmp_path / "b", listen=f"127.0.0.1:{ports[1]}", node_id="n1", **common)
                try:
                    token = admin.create_token("acme", "a")["token"]
                    with SyncClient(b.address, token=token, tenant="acme", subtenant="a", transport="inline") as c:
                        c.put(b"k", b"made on n0")
                        assert c.get(b"k") == b"made on n0"
                finally:
                    b.stop()
    finally:
        a.stop()
