"""Replication of the namespaces and tokens table to every member.

Each daemon exchanges its whole table with every other member (``Admin.SyncAuth``,
with the peer credential): right after a change here, when the membership
changes, and every ``interval`` seconds, so that a daemon that was down or
partitioned when a token was created or revoked catches up within one
interval of coming back. The table merges entry by entry, newest first
(``table``), so the order and repetition of exchanges do not matter. This
works the same under static peers and etcd membership: the members come from
the cluster map either way.
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc

from kvstore._proto.v1 import admin_pb2 as pb
from kvstore.errors import KVStoreError
from kvstore.server.auth.table import AuthTable, Entry
from kvstore.server.cluster.peers import Peers
from kvstore.server.cluster.state import ClusterState

log = logging.getLogger("kvstore.server.auth")


def to_records(table: AuthTable) -> list[pb.AuthRecord]:
    return [
        pb.AuthRecord(
            key=key,
            value=b"" if entry.deleted else json.dumps(entry.value, sort_keys=True).encode(),
            updated_ns=entry.updated_ns,
            deleted=entry.deleted,
        )
        for key, entry in table.entries.items()
    ]


def from_records(records) -> list[tuple[str, Entry]]:
    entries = []
    for record in records:
        try:
            value = None if record.deleted else json.loads(record.value)
        except ValueError:
            log.warning("ignoring a malformed table entry %r from a peer", record.key[:80])
            continue
        if value is not None and not isinstance(value, dict):
            continue
        entries.append((record.key, Entry(value, record.updated_ns)))
    return entries


class AuthSync:
    def __init__(self, table: AuthTable, cluster: ClusterState, peers: Peers, *, interval: float = 10.0, timeout: float = 5.0) -> None:
        self.table = table
        self.cluster = cluster
        self.peers = peers
        self.interval = interval
        self.timeout = timeout
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.store = None  # EtcdMembership under etcd membership
        self._stored: dict[str, int] = {}  # entry key -> updated_ns etcd has (so that merges are not written back)
        table.listeners.append(lambda keys: self._wake.set())
        cluster.on_change(lambda old, new: self._wake.set())

    def use_etcd(self, membership) -> None:
        """Keep the table in etcd too: merge what the watch delivers, write what changes here."""
        self.store = membership
        membership.on_auth = self._from_etcd

    def _from_etcd(self, items: list[tuple[str, bytes]]) -> None:
        entries = []
        for key, raw in items:
            try:
                item = json.loads(raw)
                entry = Entry(item["value"], int(item["updated_ns"]))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed table entry %r in etcd", key[:80])
                continue
            self._stored[key] = max(self._stored.get(key, 0), entry.updated_ns)
            entries.append((key, entry))
        self.table.merge(entries)

    async def _to_etcd(self) -> None:
        fresh = [
            (key, entry) for key, entry in self.table.entries.items() if entry.updated_ns > self._stored.get(key, 0)
        ]
        if not fresh:
            return
        await self.store.put_auth(
            [(key, json.dumps({"value": e.value, "updated_ns": e.updated_ns}, sort_keys=True).encode()) for key, e in fresh]
        )
        for key, entry in fresh:
            self._stored[key] = max(self._stored.get(key, 0), entry.updated_ns)

    def start(self) -> None:
        self._wake.set()  # first exchange at once: catch up with what changed while we were away
        self._task = asyncio.create_task(self._run(), name="kvstore-auth-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.exchange()

    async def replicate(self) -> int:
        """Hand a change made here to every member before the change is answered.

        Waits up to 2 s (twice the peers' longest reconnect backoff) for a member
        whose channel is reconnecting, as it is for a while after that member
        started: failing fast there would leave a token just created unknown to a
        daemon that is up. A member that is down costs those 2 s and catches up
        at its next exchange."""
        return await self.exchange(timeout=2.0, wait=True)

    async def exchange(self, timeout: float | None = None, *, wait: bool = False) -> int:
        """One exchange with every other member (and etcd); returns how many members answered.

        ``wait`` waits for members that cannot be reached yet instead of skipping them."""
        if self.store is not None:
            try:
                await self._to_etcd()
            except KVStoreError as exc:
                log.warning("writing the namespaces and tokens table to etcd failed (members still get it): %s", exc)
        others = [m for m in self.cluster.members.members if m.node_id != self.cluster.node_id]
        if not others:
            return 0
        request = pb.SyncAuthRequest(records=to_records(self.table))
        replies = await asyncio.gather(*(self._one(m, request, timeout or self.timeout, wait) for m in others))
        answered = 0
        for reply in replies:
            if reply is not None:
                answered += 1
                self.table.merge(from_records(reply.records))
        return answered

    async def _one(self, member, request, timeout: float, wait: bool) -> pb.SyncAuthResponse | None:
        try:
            return await self.peers.admin(member.address).SyncAuth(request, timeout=timeout, wait_for_ready=wait)
        except grpc.RpcError as exc:
            log.debug("table sync with %s failed: %s", member.node_id, exc.code().name)
            return None
