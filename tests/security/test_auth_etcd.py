"""Under etcd membership the namespaces and tokens table lives in etcd too: a
daemon that starts while every other daemon is down (fresh data dir) still
knows every namespace, token and revocation."""

from __future__ import annotations

import uuid

import pytest

from kvstore import errors
from kvstore.client import SyncClient
from tests.conftest import ThreadedDaemon
from tests.etcd_server import etcd_server  # noqa: F401  (fixture)

ADMIN = "admin-token-of-the-etcd-tests-0123456789"


def test_the_table_reaches_a_daemon_through_etcd_alone(tmp_path, etcd_server):  # noqa: F811
    settings = dict(
        memory=64 << 20, auth="token", admin_token=ADMIN, etcd=etcd_server.endpoint,
        etcd_prefix=f"/kvstore/test-{uuid.uuid4().hex[:8]}",
    )
    first = ThreadedDaemon(tmp_path / "first", node_id="first", **settings)
    try:
        with SyncClient(first.address, token=ADMIN, transport="inline") as admin:
            admin.create_namespace("acme", "a")
            kept = admin.create_token("acme", "a")
            gone = admin.create_token("acme", "a")
            admin.revoke_token(gone["id"])
    finally:
        first.stop()
    # No other daemon runs: what the newcomer knows came from etcd.
    newcomer = ThreadedDaemon(tmp_path / "newcomer", node_id="newcomer", **settings)
    try:
        assert newcomer.daemon.guard.table.token(kept["id"]) is not None
        with SyncClient(newcomer.address, token=kept["token"], tenant="acme", subtenant="a", transport="inline") as c:
            c.put(b"k", b"v")
            assert c.get(b"k") == b"v"
        with pytest.raises(errors.PermissionDeniedError, match="revoked"):
            with SyncClient(newcomer.address, token=gone["token"], tenant="acme", subtenant="a", transport="inline") as c:
                c.get(b"k")
    finally:
        newcomer.stop()
