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
        table.listeners.append(lambda keys: self._wake.set())
        cluster.on_change(lambda old, new: self._wake.set())

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

    async def exchange(self, timeout: float | None = None) -> int:
        """One exchange with every other member; returns how many answered."""
        others = [m for m in self.cluster.members.members if m.node_id != self.cluster.node_id]
        if not others:
            return 0
        request = pb.SyncAuthRequest(records=to_records(self.table))
        replies = await asyncio.gather(*(self._one(m, request, timeout or self.timeout) for m in others))
        answered = 0
        for reply in replies:
            if reply is not None:
                answered += 1
                self.table.merge(from_records(reply.records))
        return answered

    async def _one(self, member, request, timeout: float) -> pb.SyncAuthResponse | None:
        try:
            return await self.peers.admin(member.address).SyncAuth(request, timeout=timeout)
        except grpc.RpcError as exc:
            log.debug("table sync with %s failed: %s", member.node_id, exc.code().name)
            return None
