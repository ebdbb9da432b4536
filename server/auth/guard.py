"""The check every RPC passes before its handler runs (``Method.run``, so
gRPC and the local channel alike): who is calling, and may it do this?

``--auth open`` lets everyone do everything (namespaces come into being on
first use). ``--auth token`` wants a bearer credential on every call:

- a data token works on the Data service for the namespaces it covers (its
  tenant's, or one subtenant's), and only on namespaces an admin created;
  read-only tokens only read; and on Cluster (the map, Hello);
- the admin token works on the Admin service and Cluster, never on data;
- the peer credential (``tokens.peer_credential``) is what daemons present to
  each other: rebalancing, policy fan-out and table sync.

A missing, malformed, unknown, revoked or wrong credential is UNAUTHENTICATED;
a valid one that may not do this is PERMISSION_DENIED. Neither says anything
about the namespace asked for beyond what the caller may know (whether a key
exists is never reached). Every refusal is counted and logged by token id,
never with its secret.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvstore import errors
from kvstore.namespace import Namespace
from kvstore.protocol import metadata
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.convert import namespace_of
from kvstore.server.auth import tokens
from kvstore.server.auth.table import AuthTable, token_key

log = logging.getLogger("kvstore.server.auth")

MODES = ("open", "token")


class Need(enum.Enum):
    ANYONE = "any valid credential"
    READ = "a data token for the namespace"
    WRITE = "a read-write data token for the namespace"
    ADMIN = "the admin token"
    PEER = "the peer credential of this cluster"


# What each method needs; a method not listed needs the admin token.
RULES: dict[str, Need] = {
    "Data.Put": Need.WRITE,
    "Data.Delete": Need.WRITE,
    "Data.Get": Need.READ,
    "Data.Exists": Need.READ,
    "Data.LookupPrefix": Need.READ,
    "Data.List": Need.READ,
    "Data.Stat": Need.READ,
    "Cluster.GetClusterMap": Need.ANYONE,
    "Cluster.Hello": Need.ANYONE,
    "Admin.SyncAuth": Need.PEER,
}


@dataclass(frozen=True)
class Principal:
    """Who a call comes from."""

    kind: str  # "open" (no checks), "data", "admin" or "peer"
    token_id: str = ""
    tenant: str = ""
    subtenant: str = ""  # "": every subtenant of ``tenant``
    read_only: bool = False

    def covers(self, ns: Namespace) -> bool:
        return self.tenant == ns.tenant and (not self.subtenant or self.subtenant == ns.subtenant)

    @property
    def key(self) -> str:
        """What identifies the credential (a data-plane session belongs to it)."""
        return f"{self.kind}:{self.token_id}"

    @property
    def sees_everything(self) -> bool:
        return self.kind in ("open", "admin", "peer")

    def __str__(self) -> str:
        if self.kind != "data":
            return self.kind
        scope = f"{self.tenant}/{self.subtenant}" if self.subtenant else f"{self.tenant}/*"
        return f"token {self.token_id} ({scope}{', read-only' if self.read_only else ''})"


OPEN = Principal("open")
ADMIN = Principal("admin")
PEER = Principal("peer")
# The caller of the RPC being served (set by Method.run for its handler).
CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("kvstore_caller", default=OPEN)


def caller() -> Principal:
    return CALLER.get()


def unauthenticated(message: str) -> errors.PermissionDeniedError:
    return errors.PermissionDeniedError(message, code=ErrorCode.UNAUTHENTICATED)


def denied(message: str, code: ErrorCode = ErrorCode.PERMISSION_DENIED) -> errors.PermissionDeniedError:
    return errors.PermissionDeniedError(message, code=code)


class Guard:
    def __init__(self, mode: str, table: AuthTable, admin_token: str = "", metrics=None) -> None:
        if mode not in MODES:
            raise errors.ConfigError(f"auth: {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.table = table
        self.admin_token = admin_token
        self.peer_token = tokens.peer_credential(admin_token) if admin_token else ""
        self.metrics = metrics
        # Token id -> fingerprint of the secret that last matched its hash.
        self._verified: dict[str, bytes] = {}
        # Recent wrong secrets (id, fingerprint): a retried wrong token costs no second KDF.
        self._rejected: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        # One KDF at a time: a flood of wrong secrets takes one core at most, never the event loop.
        self._kdf = ThreadPoolExecutor(1, thread_name_prefix="kvstore-kdf")
        self._logged = (0.0, 0)  # (second, refusals logged in it)
        table.listeners.append(self._forget)

    @property
    def open(self) -> bool:
        return self.mode == "open"

    def close(self) -> None:
        self._kdf.shutdown(wait=False, cancel_futures=True)

    def _forget(self, keys: list[str]) -> None:
        for key in keys:
            if key.startswith("token/"):
                self._verified.pop(key[6:], None)

    # -- the check ------------------------------------------------------------

    async def authenticate(self, label: str, invocation_metadata) -> Principal:
        """The caller of a call with this metadata; PermissionDeniedError (UNAUTHENTICATED) if none."""
        if self.mode == "open":
            return OPEN
        try:
            return await self._principal(metadata.token_of(invocation_metadata))
        except errors.PermissionDeniedError as exc:
            self.refused(label, exc)
            raise

    async def _principal(self, token: str | None) -> Principal:
        if not token:
            raise unauthenticated(
                "no credential: this daemon runs with --auth token; present a token as 'authorization: Bearer <token>'"
                if token is None
                else "the authorization metadata is not 'Bearer <token>'"
            )
        if token.startswith(tokens.PEER_PREFIX):
            if tokens.same(token, self.peer_token):
                return PEER
            raise unauthenticated("wrong peer credential: daemons of one cluster must share its admin token")
        presented = tokens.parse(token)
        if presented is None:
            if tokens.same(token, self.admin_token):
                return ADMIN
            raise unauthenticated("not a valid token (a data token reads kvs_<id>_<secret>)")
        entry = self.table.entries.get(token_key(presented.id))
        if entry is None:
            raise unauthenticated(f"unknown token {presented.id}")
        if entry.deleted:
            raise unauthenticated(f"token {presented.id} was revoked")
        record = entry.value
        fingerprint = tokens.fingerprint(presented.secret)
        known = self._verified.get(presented.id)
        if known is None or not tokens.same(known, fingerprint):
            if (presented.id, fingerprint) in self._rejected or not await self._matches(presented, record):
                self._reject(presented.id, fingerprint)
                raise unauthenticated(f"wrong secret for token {presented.id}")
            self._verified[presented.id] = fingerprint
        return Principal("data", presented.id, record["tenant"], record["subtenant"], bool(record["read_only"]))

    async def _matches(self, presented: tokens.Presented, record: dict) -> bool:
        salt, expected = bytes.fromhex(record["salt"]), bytes.fromhex(record["hash"])
        loop = asyncio.get_running_loop()
        actual = await loop.run_in_executor(self._kdf, tokens.hash_secret, presented.secret, salt)
        # Revoked while we hashed: the table decides, not the hash.
        return tokens.same(actual, expected) and self.table.token(presented.id) is not None

    def _reject(self, token_id: str, fingerprint: bytes) -> None:
        self._rejected[(token_id, fingerprint)] = None
        while len(self._rejected) > 4096:
            self._rejected.popitem(last=False)

    def authorize(self, label: str, principal: Principal, request) -> None:
        """PermissionDeniedError unless ``principal`` may call ``label`` with ``request``."""
        if principal.kind == "open":
            return
        try:
            self._authorize(RULES.get(label, Need.ADMIN), label, principal, request)
        except errors.PermissionDeniedError as exc:
            self.refused(label, exc, principal)
            raise

    def _authorize(self, need: Need, label: str, principal: Principal, request) -> None:
        kind = principal.kind
        if kind == "peer" or need is Need.ANYONE:
            return
        if need is Need.PEER:
            raise denied(f"{label} is for the daemons of this cluster only")
        if need is Need.ADMIN:
            if kind != "admin":
                raise denied(f"{label} needs the admin token; data tokens never work on the Admin service")
            return
        if kind == "admin":
            raise denied(f"{label} needs a data token: the admin token is not one (create one with 'kvstore token create')")
        ns = namespace_of(request)
        if not principal.covers(ns):
            raise denied(f"{principal} may not use namespace {ns.tenant}/{ns.subtenant}")
        if need is Need.WRITE and principal.read_only:
            raise denied(f"{label} writes, and {principal} may only read")
        if not self.table.has_namespace(ns):
            raise denied(
                f"namespace {ns.tenant}/{ns.subtenant} does not exist: an admin creates it with 'kvstore ns create'",
                ErrorCode.UNKNOWN_NAMESPACE,
            )

    def refused(self, label: str, error: errors.KVStoreError, principal: Principal | None = None) -> None:
        if self.metrics is not None:
            self.metrics.auth_denied.labels(label, str(error.code)).inc()
        # Logged, but a flood of refusals writes at most 10 lines a second.
        second = int(time.monotonic())
        start, count = self._logged
        if start != second:
            start, count = second, 0
        if count < 10:
            log.warning("refused %s%s: %s", label, f" from {principal}" if principal else "", error.message)
        self._logged = (start, count + 1)
