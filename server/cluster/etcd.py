"""Dynamic membership through etcd (the v3 API over gRPC; messages and stubs
from ``aetcd.rpc``, on a ``grpc.aio`` channel of our own).

Keys, under a cluster prefix (default ``/kvstore/default``)::

    {prefix}/members/{node_id}              {"address": "host:port", "weight": 1.0}, on this daemon's lease
    {prefix}/epoch                          20-digit decimal: the highest epoch any daemon has derived
    {prefix}/policies/{tenant}/{subtenant}  a namespace policy (JSON object), no lease
    {prefix}/auth/{entry key}               an entry of the namespaces and tokens table
                                            (JSON {"value", "updated_ns"}; server/auth/table.py), no lease

Epoch. The epoch of a member list is the etcd revision of the last change to
the members prefix: the mod revision of the newest live member key, or the
revision of a later deletion. A daemon that watches sees every change and
takes its revision. A daemon that lists (at start, after a reconnect) sees the
live keys only, so it also replays the watch history from just after the
newest key, which tells it the revision of any later deletion. When that
history is compacted, ``{prefix}/epoch`` fills the gap: every daemon that
holds an epoch newer than the live keys show raises that key to its epoch
(compare-and-set, never lowered), and every daemon raises its epoch to the
key's value. So the epoch never decreases on a daemon, and all daemons agree
on it once the key has been written (one etcd round trip after a deletion,
and at once whenever the history is there). A daemon that finds the member
set changed but no newer revision to date it by (it missed a departure whose
history is compacted, or etcd was wiped) takes the snapshot's revision, or its
old epoch + 1 if that is not newer, and publishes it the same way.

Failures. etcd going away never changes the list: the daemon keeps serving the
last one and ``status()`` says ``connected: False`` with the error. It retries
with capped, jittered backoff, moving to the next endpoint on every failure,
and when etcd answers again it keeps its lease if etcd still has it (a
restarted etcd keeps leases), or takes a new one and registers again, then
lists and watches anew. ``stop()`` revokes the lease, so the others see the
departure at once; a daemon that dies without it leaves after the lease TTL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from aetcd import rpc

from kvstore.backoff import Backoff
from kvstore.errors import ConfigError, DeadlineExceededError, InvalidArgumentError, KVStoreError, UnavailableError
from kvstore.namespace import validate_name
from kvstore.protocol.status import error_from_status
from kvstore.server.cluster.membership import Member, MemberList, Membership
from kvstore.server.config import ServerConfig
from kvstore.units import parse_address

log = logging.getLogger("kvstore.server.cluster.etcd")

DEFAULT_START_TIMEOUT = 30.0
# Reconnects: 0.1 s doubling up to 2 s, spread ±20%.
RECONNECT = Backoff(initial=0.1, multiplier=2.0, cap=2.0, jitter=0.2)

_PUT = rpc.Event.EventType.PUT
_DELETE = rpc.Event.EventType.DELETE
# Watches ask etcd to cancel them when the member they talk to loses its
# leader, so a partitioned etcd member cannot feed us a frozen view.
_WATCH_METADATA = (("hasleader", "true"),)
_CHANNEL_OPTIONS = (
    # etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)

PolicyKey = tuple[str, str]
PolicyTable = dict[PolicyKey, dict]


class _SessionEnded(Exception):
    """The current etcd session must be dropped and a new one started."""


class _Compacted(Exception):
    def __init__(self, revision: int) -> None:
        super().__init__(f"watch history compacted up to revision {revision}")
        self.revision = revision


async def _cancel(tasks: Sequence[asyncio.Task]) -> None:
    """Cancel ``tasks`` and wait until they have ended. A task can swallow a
    cancellation (Python 3.11's ``asyncio.wait_for`` does when its inner call
    finishes at the same moment), so one still running is cancelled again."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the session's own error was already handled


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _endpoint(text: str) -> str:
    """ "host:port" from "host:port" or "http://host:port"."""
    value = str(text).strip()
    if value.startswith("https://"):
        raise ConfigError(f"etcd: {text!r}: TLS to etcd is not supported; use http:// or HOST:PORT")
    value = value.removeprefix("http://").rstrip("/")
    try:
        parse_address(value)
    except ValueError as exc:
        raise ConfigError(f"etcd: {exc}") from None
    return value


def _encode_epoch(epoch: int) -> bytes:
    # Fixed width, so etcd's byte-wise value comparison orders epochs numerically.
    return b"%020d" % epoch


def _decode_epoch(value: bytes) -> int:
    try:
        return max(0, int(value))
    except ValueError:
        return 0


def etcd_error(exc: BaseException) -> KVStoreError:
    """The kvstore error of a failed etcd call (a gRPC status, through the one
    status table, or a timeout). etcd is a dependency, not the caller's peer:
    whatever it answers beyond a bad request or a timeout means "unavailable"."""
    if isinstance(exc, grpc.aio.AioRpcError):
        error = error_from_status(exc.code(), f"etcd: {exc.details() or exc.code().name}", None, "etcd")
        if isinstance(error, (InvalidArgumentError, DeadlineExceededError, UnavailableError)):
            return error
        return UnavailableError(error.message)
    if isinstance(exc, TimeoutError):
        return DeadlineExceededError("etcd did not answer in time")
    return UnavailableError(f"etcd unavailable: {exc}")


class EtcdMembership(Membership):
    """Registers ``me`` under a lease and follows every member of the prefix."""

    def __init__(
        self,
        endpoints: Sequence[str],
        me: Member,
        *,
        prefix: str = ServerConfig.etcd_prefix,
        ttl: float = ServerConfig.etcd_ttl,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        backoff: Backoff = RECONNECT,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        self.endpoints = tuple(_endpoint(e) for e in endpoints if str(e).strip())
        if not self.endpoints:
            raise ConfigError("etcd: no endpoints given")
        if not ttl > 0:
            raise ConfigError(f"etcd_ttl: {ttl} must be positive")
        if not prefix.strip("/"):
            raise ConfigError(f"etcd_prefix: {prefix!r} is empty")
        validate_name("node id", me.node_id)
        self.me = me
        self.prefix = "/" + prefix.strip("/")
        self.ttl = float(ttl)
        self.start_timeout = start_timeout
        self.backoff = backoff
        # etcd leases have whole-second TTLs (and a floor of ~1.5 x the election timeout).
        self._lease_ttl = max(1, math.ceil(self.ttl))
        self._keepalive_every = self.ttl / 3
        self._rpc_timeout = min(5.0, max(1.0, self.ttl / 3))

        self._members_prefix = f"{self.prefix}/members/".encode()
        self._policies_prefix = f"{self.prefix}/policies/".encode()
        self._auth_prefix = f"{self.prefix}/auth/".encode()
        self._epoch_key = f"{self.prefix}/epoch".encode()
        self._my_key = self._members_prefix + me.node_id.encode()
        self._my_value = json.dumps({"address": me.address, "weight": me.weight}, sort_keys=True).encode()

        # What etcd told us last: live member keys (with mod revisions), the
        # epoch key, policies; and the list handed out.
        self._members: dict[str, Member] = {}
        self._mod_revisions: dict[str, int] = {}
        self._epoch_key_value = 0
        self._epoch = 0
        self._policies: PolicyTable = {}
        self._list = MemberList(0, (me,))
        self._snapshot_revision = 0

        self._on_change: Callable[[MemberList], None] | None = None
        self._on_policies: Callable[[PolicyTable], None] | None = None
        # Gets [(entry key, JSON bytes)] of the table's entries: all at each list, then each change.
        self.on_auth: Callable[[list[tuple[str, bytes]]], None] | None = None
        self._task: asyncio.Task | None = None
        self._first: asyncio.Future | None = None
        self._kv: Any = None
        self._lease_id = 0
        self._endpoint_index = 0
        self._connected = False
        self._last_error = ""
        self._sessions = 0

    # -- Membership ---------------------------------------------------------

    async def start(
        self,
        on_change: Callable[[MemberList], None],
        on_policies: Callable[[PolicyTable], None] | None = None,
    ) -> MemberList:
        """Register, read the first list and return it; ``on_change`` gets every
        later list. ``on_policies``, if given, gets the whole policy table once
        the first list is read and again after every policy change."""
        if self._task is not None:
            raise RuntimeError("EtcdMembership already started")
        self._on_change, self._on_policies = on_change, on_policies
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"etcd-membership-{self.me.node_id}")
        try:
            async with asyncio.timeout(self.start_timeout):
                await asyncio.shield(self._first)
        except TimeoutError:
            await self.stop()
            raise UnavailableError(
                f"etcd at {','.join(self.endpoints)} unreachable for {self.start_timeout:g}s: {self._last_error}"
            ) from None
        return self._list

    async def stop(self, *, revoke: bool = True) -> None:
        """Leave: revoke the lease (the others see it at once) and stop watching.
        ``revoke=False`` just stops, as a crash would: the others notice after the TTL."""
        task, self._task = self._task, None
        if task is not None:
            await _cancel([task])
        lease_id, self._lease_id = self._lease_id, 0
        self._connected = False
        if revoke and lease_id:
            await self._revoke(lease_id)

    def current(self) -> MemberList:
        return self._list

    def status(self) -> dict:
        return {
            "kind": "etcd",
            "connected": self._connected,
            "endpoints": list(self.endpoints),
            "endpoint": self.endpoints[self._endpoint_index] if self._connected else "",
            "prefix": self.prefix,
            "lease_id": self._lease_id,
            "epoch": self._list.epoch,
            "members": len(self._list.members),
            "sessions": self._sessions,
            "last_error": self._last_error,
        }

    # -- namespace policies ------------------------------------------------

    async def put_policy(self, tenant: str, subtenant: str, policy: dict) -> None:
        """Store the policy of ``(tenant, subtenant)``; every daemon's watch sees it."""
        key = self._policy_key(tenant, subtenant)
        if not isinstance(policy, dict):
            raise InvalidArgumentError(f"policy of {tenant}/{subtenant} must be a dict, not {type(policy).__name__}")
        value = json.dumps(policy, sort_keys=True).encode()
        await self._unary(lambda kv: kv.Put(rpc.PutRequest(key=key, value=value), timeout=self._rpc_timeout))

    async def delete_policy(self, tenant: str, subtenant: str) -> None:
        """Remove the policy of ``(tenant, subtenant)`` (back to the cluster default)."""
        key = self._policy_key(tenant, subtenant)
        await self._unary(lambda kv: kv.DeleteRange(rpc.DeleteRangeRequest(key=key), timeout=self._rpc_timeout))

    async def policies(self) -> PolicyTable:
        """Every namespace policy: read from etcd, or the last one seen while it is unreachable."""
        if self._kv is not None:
            try:
                request = rpc.RangeRequest(key=self._policies_prefix, range_end=_prefix_end(self._policies_prefix))
                reply = await self._kv.Range(request, timeout=self._rpc_timeout)
                return self._parse_policies(reply.kvs)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                log.warning("etcd: reading policies failed, returning the last seen: %s", etcd_error(exc))
        return dict(self._policies)

    # -- the namespaces and tokens table -------------------------------------

    async def put_auth(self, entries: list[tuple[str, bytes]]) -> None:
        """Store table entries (one transaction); every daemon's watch sees them."""
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=self._auth_prefix + k.encode(), value=v)) for k, v in entries]
        if ops:
            await self._unary(lambda kv: kv.Txn(rpc.TxnRequest(success=ops), timeout=self._rpc_timeout))

    def _auth_changed(self, kvs) -> None:
        if self.on_auth is not None:
            self.on_auth([(item.key[len(self._auth_prefix):].decode(errors="replace"), item.value) for item in kvs])

    def _policy_key(self, tenant: str, subtenant: str) -> bytes:
        validate_name("tenant", tenant)
        validate_name("subtenant", subtenant)
        return self._policies_prefix + f"{tenant}/{subtenant}".encode()

    async def _unary(self, call: Callable[[Any], Any]) -> Any:
        kv = self._kv
        if kv is None:
            raise UnavailableError(f"etcd unreachable: {self._last_error or 'not connected'}")
        try:
            return await call(kv)
        except grpc.aio.AioRpcError as exc:
            raise etcd_error(exc) from exc

    # -- the session loop --------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while True:
            endpoint = self.endpoints[self._endpoint_index]
            channel = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
            try:
                await self._session(channel)
                raise _SessionEnded("session ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure means: reconnect
                error = etcd_error(exc) if isinstance(exc, (grpc.aio.AioRpcError, TimeoutError)) else exc
                self._last_error = f"{endpoint}: {error}"
                if self._connected:
                    log.warning("etcd: lost %s (%s); keeping epoch %d and retrying", endpoint, error, self._list.epoch)
                    attempt = 0
                else:
                    log.debug("etcd: %s failed: %s", endpoint, error)
                self._connected = False
            finally:
                self._kv = None
                await channel.close(grace=None)
            self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
            await asyncio.sleep(self.backoff.delay(attempt))
            attempt += 1

    async def _session(self, channel: grpc.aio.Channel) -> None:
        kv, lease, watch = rpc.KVStub(channel), rpc.LeaseStub(channel), rpc.WatchStub(channel)
        await self._register(kv, lease)
        self._kv = kv
        self._connected, self._last_error = True, ""
        self._sessions += 1
        revision, replay_from = await self._snapshot(kv)
        log.info(
            "etcd: %s registered at %s (lease %x), epoch %d, members %s",
            self.me.node_id,
            self.endpoints[self._endpoint_index],
            self._lease_id,
            self._list.epoch,
            ",".join(self._list.node_ids),
        )
        tasks = [
            asyncio.create_task(self._keepalive(lease), name="etcd-keepalive"),
            asyncio.create_task(self._watch(watch, kv, revision, replay_from), name="etcd-watch"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the failure that ended the session
        finally:
            await _cancel(tasks)

    async def _register(self, kv, lease) -> None:
        """Keep our lease if etcd still has it, else take a new one; then make
        sure our key holds our value on that lease (no write when it does)."""
        if self._lease_id:
            try:
                reply = await self._keepalive_once(lease)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                reply = None
            if reply is None or reply.TTL <= 0:
                log.info("etcd: lease %x of %s expired; taking a new one", self._lease_id, self.me.node_id)
                self._lease_id = 0
        if not self._lease_id:
            grant = await lease.LeaseGrant(rpc.LeaseGrantRequest(TTL=self._lease_ttl), timeout=self._rpc_timeout)
            if grant.error:
                raise _SessionEnded(f"lease grant refused: {grant.error}")
            self._lease_id = grant.ID
        same_value = rpc.Compare(
            key=self._my_key, target=rpc.Compare.CompareTarget.VALUE,
            result=rpc.Compare.CompareResult.EQUAL, value=self._my_value,
        )  # fmt: skip
        same_lease = rpc.Compare(
            key=self._my_key, target=rpc.Compare.CompareTarget.LEASE,
            result=rpc.Compare.CompareResult.EQUAL, lease=self._lease_id,
        )  # fmt: skip
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=self._my_key, value=self._my_value, lease=self._lease_id))
        await kv.Txn(rpc.TxnRequest(compare=[same_value, same_lease], failure=[put]), timeout=self._rpc_timeout)

    async def _keepalive_once(self, lease):
        call = lease.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=self._lease_id)]), timeout=self._rpc_timeout)
        try:
            async for reply in call:
                return reply
            return None
        finally:
            call.cancel()

    async def _keepalive(self, lease) -> None:
        call = lease.LeaseKeepAlive()
        try:
            while True:
                async with asyncio.timeout(self._rpc_timeout):
                    await call.write(rpc.LeaseKeepAliveRequest(ID=self._lease_id))
                    reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise _SessionEnded("etcd closed the lease keepalive stream")
                if reply.TTL <= 0:
                    raise _SessionEnded(f"lease {self._lease_id:x} expired")
                await asyncio.sleep(self._keepalive_every)
        finally:
            call.cancel()

    async def _snapshot(self, kv) -> tuple[int, int]:
        """List members, the epoch key and policies at one revision; returns
        that revision and where to replay the watch history from."""

        def range_op(key: bytes, end: bytes = b"") -> rpc.RequestOp:
            return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=end))

        reply = await kv.Txn(
            rpc.TxnRequest(
                success=[
                    range_op(self._members_prefix, _prefix_end(self._members_prefix)),
                    range_op(self._epoch_key),
                    range_op(self._policies_prefix, _prefix_end(self._policies_prefix)),
                    range_op(self._auth_prefix, _prefix_end(self._auth_prefix)),
                ]
            ),
            timeout=self._rpc_timeout,
        )
        revision = reply.header.revision
        members_kvs, epoch_kvs, policy_kvs, auth_kvs = (r.response_range.kvs for r in reply.responses)
        members, mod_revisions = {}, {}
        for item in members_kvs:
            member = self._parse_member(item.key, item.value)
            if member is not None:
                members[member.node_id] = member
                mod_revisions[member.node_id] = item.mod_revision
        self._members, self._mod_revisions = members, mod_revisions
        self._epoch_key_value = _decode_epoch(epoch_kvs[0].value) if epoch_kvs else 0
        self._snapshot_revision = revision
        self._set_policies(self._parse_policies(policy_kvs), initial=not self._first.done())
        self._auth_changed(auth_kvs)
        await self._advance(max(self._visible_epoch(), 1), revision, kv)
        return revision, max(mod_revisions.values(), default=revision) + 1

    async def _watch(self, watch, kv, revision: int, replay_from: int) -> None:
        start = min(replay_from, revision + 1)
        while True:
            try:
                await self._watch_stream(watch, kv, start)
                raise _SessionEnded("etcd closed the watch stream")
            except _Compacted as exc:
                if start > revision:
                    raise _SessionEnded(str(exc)) from None
                # The replay only refines the epoch; the epoch key covers what it cannot.
                log.info("etcd: %s; watching from revision %d", exc, revision + 1)
                start = revision + 1

    async def _watch_stream(self, watch, kv, start: int) -> None:
        prefix = f"{self.prefix}/".encode()
        create = rpc.WatchCreateRequest(key=prefix, range_end=_prefix_end(prefix), start_revision=start)
        call = watch.Watch(metadata=_WATCH_METADATA)
        try:
            async with asyncio.timeout(self._rpc_timeout):
                await call.write(rpc.WatchRequest(create_request=create))
            async for response in call:
                if response.compact_revision:
                    raise _Compacted(response.compact_revision)
                if response.canceled:
                    raise _SessionEnded(f"etcd canceled the watch: {response.cancel_reason or 'no reason given'}")
                if response.events:
                    await self._apply(response.events, kv)
        finally:
            call.cancel()

    # -- applying what etcd says -------------------------------------------

    async def _apply(self, events, kv) -> None:
        revision = 0
        policies = None
        auth = []
        for event in events:
            key, rev = event.kv.key, event.kv.mod_revision
            if key.startswith(self._members_prefix):
                revision = max(revision, rev)
                if rev <= self._snapshot_revision:
                    continue  # replayed history: already in the snapshot, it only dates it
                node_id = key[len(self._members_prefix) :].decode(errors="replace")
                if event.type == _DELETE:
                    self._members.pop(node_id, None)
                    self._mod_revisions.pop(node_id, None)
                else:
                    member = self._parse_member(key, event.kv.value)
                    if member is None:
                        continue
                    self._members[member.node_id] = member
                    self._mod_revisions[member.node_id] = rev
            elif key == self._epoch_key and rev > self._snapshot_revision:
                self._epoch_key_value = _decode_epoch(event.kv.value) if event.type == _PUT else 0
                revision = max(revision, self._epoch_key_value)
            elif key.startswith(self._auth_prefix) and rev > self._snapshot_revision:
                if event.type == _PUT:  # entries are never deleted: a deletion is an entry too
                    auth.append(event.kv)
            elif key.startswith(self._policies_prefix) and rev > self._snapshot_revision:
                if policies is None:
                    policies = dict(self._policies)
                name = self._policy_name(key)
                if name is None:
                    continue
                if event.type == _DELETE:
                    policies.pop(name, None)
                else:
                    policy = self._parse_policy(key, event.kv.value)
                    if policy is not None:
                        policies[name] = policy
        if policies is not None:
            self._set_policies(policies)
        if auth:
            self._auth_changed(auth)
        if revision:
            await self._advance(revision, revision, kv)
        if self.me.node_id not in self._members:
            # Our key is gone (lease revoked or expired, or deleted by hand): register again.
            raise _SessionEnded(f"{self.me.node_id}'s member key was deleted")

    async def _advance(self, candidate: int, floor: int, kv) -> None:
        """Move the epoch to ``candidate`` (never back; a member set that
        differs from the published one always gets a newer epoch, at least
        ``floor``) and publish the list. Then write the epoch to the epoch key
        if the live keys alone would not tell it to a daemon that lists later."""
        changed = self._list.members != self._member_tuple()
        epoch = max(self._epoch, candidate)
        if changed and self._epoch and epoch <= self._epoch:
            epoch = max(self._epoch + 1, floor)
        self._epoch = epoch
        self._publish()
        if epoch > self._visible_epoch():
            await self._raise_epoch_key(kv, epoch)

    def _visible_epoch(self) -> int:
        return max(max(self._mod_revisions.values(), default=0), self._epoch_key_value)

    async def _raise_epoch_key(self, kv, epoch: int) -> None:
        value = _encode_epoch(epoch)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=self._epoch_key, value=value))
        absent = rpc.Compare(
            key=self._epoch_key, target=rpc.Compare.CompareTarget.VERSION,
            result=rpc.Compare.CompareResult.EQUAL, version=0,
        )  # fmt: skip
        lower = rpc.Compare(
            key=self._epoch_key, target=rpc.Compare.CompareTarget.VALUE,
            result=rpc.Compare.CompareResult.LESS, value=value,
        )  # fmt: skip
        read = rpc.RequestOp(request_range=rpc.RangeRequest(key=self._epoch_key))
        for compare in (absent, lower):
            reply = await kv.Txn(
                rpc.TxnRequest(compare=[compare], success=[put], failure=[read]), timeout=self._rpc_timeout
            )
            if reply.succeeded:
                self._epoch_key_value = epoch
                return
            kvs = reply.responses[0].response_range.kvs
            if kvs:  # another daemon got there first: the key already holds this epoch or more
                self._epoch_key_value = _decode_epoch(kvs[0].value)
                if self._epoch_key_value >= epoch:
                    return

    def _member_tuple(self) -> tuple[Member, ...]:
        return tuple(sorted(self._members.values(), key=lambda m: m.node_id))

    def _publish(self) -> None:
        new = MemberList(self._epoch, self._member_tuple())
        if new == self._list and self._first.done():
            return
        self._list = new
        if not self._first.done():
            self._first.set_result(new)
            return
        log.info("etcd: epoch %d, members %s", new.epoch, ",".join(new.node_ids) or "(none)")
        if self._on_change is not None:
            try:
                self._on_change(new)
            except Exception:
                log.exception("etcd: the membership change callback failed")

    def _set_policies(self, policies: PolicyTable, *, initial: bool = False) -> None:
        if policies == self._policies and not initial:
            return
        self._policies = policies
        if self._on_policies is not None:
            try:
                self._on_policies(dict(policies))
            except Exception:
                log.exception("etcd: the policy change callback failed")

    # -- parsing -----------------------------------------------------------

    def _parse_member(self, key: bytes, value: bytes) -> Member | None:
        node_id = key[len(self._members_prefix) :].decode(errors="replace")
        try:
            data = json.loads(value)
            member = Member(validate_name("node id", node_id), str(data["address"]), float(data.get("weight", 1.0)))
            parse_address(member.address)
        except Exception as exc:  # noqa: BLE001 - someone else's bad key must not stop us
            log.warning("etcd: ignoring member key %r: %s", key, exc)
            return None
        return member

    def _policy_name(self, key: bytes) -> PolicyKey | None:
        tenant, _, subtenant = key[len(self._policies_prefix) :].decode(errors="replace").partition("/")
        if not tenant or not subtenant:
            log.warning("etcd: ignoring policy key %r", key)
            return None
        return tenant, subtenant

    def _parse_policy(self, key: bytes, value: bytes) -> dict | None:
        try:
            policy = json.loads(value)
        except ValueError as exc:
            log.warning("etcd: ignoring policy %r: %s", key, exc)
            return None
        if not isinstance(policy, dict):
            log.warning("etcd: ignoring policy %r: not a JSON object", key)
            return None
        return policy

    def _parse_policies(self, kvs) -> PolicyTable:
        table: PolicyTable = {}
        for item in kvs:
            name = self._policy_name(item.key)
            policy = self._parse_policy(item.key, item.value) if name else None
            if policy is not None:
                table[name] = policy
        return table

    # -- leaving -----------------------------------------------------------

    async def _revoke(self, lease_id: int) -> None:
        """Revoke the lease through the first endpoint that answers."""
        errors = []
        for i in range(len(self.endpoints)):
            endpoint = self.endpoints[(self._endpoint_index + i) % len(self.endpoints)]
            channel = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
            try:
                await rpc.LeaseStub(channel).LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), timeout=self._rpc_timeout)
                log.info("etcd: %s left (lease %x revoked)", self.me.node_id, lease_id)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return  # already expired
                errors.append(f"{endpoint}: {etcd_error(exc)}")
            finally:
                await channel.close(grace=None)
        log.warning("etcd: could not revoke lease %x (%s); peers will drop us after %ds",
                    lease_id, "; ".join(errors), self._lease_ttl)  # fmt: skip
