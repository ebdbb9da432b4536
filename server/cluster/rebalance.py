"""Moving blocks to their owners in the background.

After a membership change, and every ``rebalance_interval`` seconds as
anti-entropy, the daemon walks its persisted blocks namespace by namespace.
For each block it asks the block's owners under the current map whether they
hold it, copies it to those that do not (throttled to ``rebalance_rate``
bytes per second), and, when this daemon is not an owner itself, drops its
own copy once every owner has confirmed one. The same walk re-replicates the
blocks of a daemon that left, and sends home blocks that a client wrote to a
stand-in while an owner was down.

Progress is saved after every page (``rebalance.json`` in the data dir), so a
restarted daemon resumes where it stopped rather than starting over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import grpc

from kvstore import errors
from kvstore._proto.v1 import admin_pb2, cluster_pb2, data_pb2
from kvstore.namespace import Namespace
from kvstore.protocol import metadata
from kvstore.protocol.convert import namespace_to_proto
from kvstore.protocol.status import error_from_rpc
from kvstore.server.cluster.membership import Member, MemberList
from kvstore.server.cluster.peers import Peers
from kvstore.server.cluster.state import ClusterState
from kvstore.server.storage.store import BlockStore

log = logging.getLogger("kvstore.server.rebalance")

STATE_FILE = "rebalance.json"
PAGE_KEYS = 256
PUSH_BYTES = 8 << 20  # one Put to a peer carries at most this much


class RateLimiter:
    """A token bucket over bytes: ``take(n)`` waits until ``n`` more bytes fit the rate."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._allowance = rate
        self._stamp = time.monotonic()

    async def take(self, nbytes: int) -> None:
        now = time.monotonic()
        self._allowance = min(self.rate, self._allowance + (now - self._stamp) * self.rate)
        self._stamp = now
        self._allowance -= nbytes
        if self._allowance < 0:
            await asyncio.sleep(-self._allowance / self.rate)


class Rebalancer:
    def __init__(
        self,
        cluster: ClusterState,
        store: BlockStore,
        *,
        rate: int,
        interval: float,
        data_dir: Path,
        peers: Peers,
        timeout: float = 10.0,
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.limiter = RateLimiter(rate)
        self.interval = interval
        self.timeout = timeout
        self.peers = peers
        self._state_path = Path(data_dir) / STATE_FILE
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.status = admin_pb2.RebalanceStatus(state="idle")
        cluster.on_change(lambda old, new: self._wake.set())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kvstore-rebalance")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def snapshot(self) -> admin_pb2.RebalanceStatus:
        copy = admin_pb2.RebalanceStatus()
        copy.CopyFrom(self.status)
        return copy

    async def learn_history(self) -> None:
        """A daemon with no record of an earlier membership (it just joined) asks
        its peers where blocks were, so that reads can fall back there."""
        cluster = self.cluster
        if cluster.previous is not None:
            return
        for member in cluster.members.members:
            if member.node_id == cluster.node_id:
                continue
            try:
                seen = await self.peers.cluster(member.address).GetClusterMap(
                    cluster_pb2.GetClusterMapRequest(), timeout=2
                )
            except grpc.RpcError:
                continue
            theirs = _member_list(seen.epoch, seen.nodes)
            if theirs.members != cluster.members.members:
                learned = cluster.learn_previous(theirs)
            else:
                learned = cluster.learn_previous(_member_list(seen.previous_epoch, seen.previous_nodes))
            if learned:
                log.info("blocks may still be on %s (learned from %s)", ", ".join(cluster.previous.node_ids), member.node_id)
            return

    async def _run(self) -> None:
        await self.learn_history()
        delay = 0.0
        while True:
            if delay:
                try:
                    async with asyncio.timeout(delay):  # (wait_for can swallow a cancel on 3.11)
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            if len(self.cluster.members.members) <= 1 and self.cluster.previous is None:
                self.status.state = "idle"
                delay = self.interval
                continue
            try:
                complete = await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a pass must never kill the loop
                log.exception("rebalance pass failed")
                self.status.errors += 1
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                complete = False
            if complete:
                self.status.state = "idle"
                if self.cluster.previous is not None and await self._everyone_done(self.status.epoch):
                    self.cluster.settled(self.status.epoch)
                delay = self.interval if self.cluster.previous is None else min(2.0, self.interval)
            else:
                self.status.state = "waiting"
                delay = min(2.0, self.interval)

    async def _everyone_done(self, epoch: int) -> bool:
        """Whether every member finished a pass at ``epoch``: only then may the
        map stop naming the previous owners (a new member finishes at once,
        long before the old ones have sent it their blocks)."""
        for member in self.cluster.members.members:
            if member.node_id == self.cluster.node_id:
                continue
            try:
                stats = await self.peers.admin(member.address).ServerStats(admin_pb2.ServerStatsRequest(), timeout=2)
            except grpc.RpcError:
                return False
            if stats.rebalance.epoch != epoch or stats.rebalance.state != "idle":
                return False
        return True

    # -- one pass -----------------------------------------------------------

    async def run_pass(self) -> bool:
        """Walk every persisted block once; True when every block is where it belongs."""
        epoch = self.cluster.epoch
        cursor = self._resume_point(epoch)
        status = self.status
        if status.epoch != epoch or cursor is None:
            status.keys_scanned = status.keys_copied = status.bytes_copied = status.keys_dropped = 0
        status.epoch = epoch
        status.state = "running"
        namespaces = sorted(self.store.namespaces(), key=lambda ns: ns.prefix)
        status.keys_total = sum(self.store.namespace_counters(ns).blocks for ns in namespaces)
        complete = True
        for ns in namespaces:
            after = b""
            if cursor is not None:
                if ns.prefix < cursor[0]:
                    continue
                if ns.prefix == cursor[0]:
                    after = cursor[1]
            while True:
                if self.cluster.epoch != epoch:
                    return False  # the map changed under us: start over with the new one
                page, truncated = await self.store.scan(ns, after, PAGE_KEYS)
                if not page:
                    break
                if not await self._settle_page(ns, [key for key, _ in page]):
                    complete = False
                after = page[-1][0]
                status.keys_scanned += len(page)
                self._save(epoch, ns.prefix, after, done=False)
                if not truncated:
                    break
            cursor = None
        self._save(epoch, b"", b"", done=True)
        log.info(
            "rebalance pass at epoch %d %s: %d scanned, %d copied (%d bytes), %d dropped",
            epoch, "complete" if complete else "incomplete", status.keys_scanned, status.keys_copied,
            status.bytes_copied, status.keys_dropped,
        )
        return complete

    async def _settle_page(self, ns: Namespace, storage_keys: list[bytes]) -> bool:
        """Make sure every owner of these blocks holds them; drop the ones we do not own."""
        me = self.cluster.node_id
        prefix_len = len(ns.prefix)
        keys = [k[prefix_len:] for k in storage_keys]
        owners = {key: self.cluster.owners(ns, key) for key in keys}
        by_node: dict[str, list[bytes]] = defaultdict(list)
        for key, nodes in owners.items():
            for node in nodes:
                if node != me:
                    by_node[node].append(key)
        confirmed: dict[bytes, int] = defaultdict(int)
        complete = True
        for node, node_keys in by_node.items():
            try:
                held, same_map = await self._exists(node, ns, node_keys)
                missing = [k for k, present in zip(node_keys, held) if not present]
                await self._push(node, ns, missing)
            except errors.KVStoreError as exc:
                complete = False
                self.status.errors += 1
                self.status.last_error = f"{node}: {exc.message}"
                log.debug("rebalance: %s unavailable: %s", node, exc)
                continue
            if not same_map:
                # An owner that routes by another map may itself be about to
                # drop the block in favour of us: its word is not enough yet.
                complete = False
                continue
            for key in node_keys:
                confirmed[key] += 1
        drop = [ns.prefix + key for key, nodes in owners.items() if me not in nodes and confirmed[key] == len(nodes)]
        if drop:
            await self.store.delete(drop)
            self.status.keys_dropped += len(drop)
        return complete

    async def _exists(self, node: str, ns: Namespace, keys: list[bytes]) -> tuple[list[bool], bool]:
        """Which of ``keys`` ``node`` holds, and whether it routes by our map."""
        request = data_pb2.KeysRequest(namespace=namespace_to_proto(ns), keys=keys)
        response, epoch = await self._call(node, "Exists", request)
        return list(response.exists), epoch == self.cluster.epoch

    async def _push(self, node: str, ns: Namespace, keys: list[bytes]) -> None:
        batch: list[data_pb2.BlockWrite] = []
        size = 0
        for key in keys:
            (block,) = await self.store.get([ns.prefix + key], PUSH_BYTES)
            if block is None:
                continue  # deleted meanwhile
            value = bytes(block.value)
            await self.limiter.take(len(value))
            batch.append(data_pb2.BlockWrite(key=key, value=value, length=block.length, checksum=block.checksum))
            size += len(value)
            if size >= PUSH_BYTES:
                await self._put(node, ns, batch)
                batch, size = [], 0
        if batch:
            await self._put(node, ns, batch)

    async def _put(self, node: str, ns: Namespace, blocks: list[data_pb2.BlockWrite]) -> None:
        request = data_pb2.PutRequest(namespace=namespace_to_proto(ns), blocks=blocks, durability=data_pb2.DURABILITY_DISK)
        await self._call(node, "Put", request)
        self.status.keys_copied += len(blocks)
        self.status.bytes_copied += sum(b.length for b in blocks)

    async def _call(self, node: str, method: str, request):
        """The response of ``node``, and the epoch of the map it routes by."""
        member = self.cluster.members.get(node)
        if member is None:
            raise errors.UnavailableError(f"{node} is not in the cluster map any more")
        stub = self.peers.data(member.address)
        try:
            call = getattr(stub, method)(request, timeout=self.timeout, metadata=((metadata.EPOCH, str(self.cluster.epoch)),))
            response = await call
            theirs = metadata.epoch_of(await call.trailing_metadata()) or ""
            return response, int(theirs) if theirs.isdigit() else None
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"{node} ({member.address}) {method}") from None

    # -- resumable progress ---------------------------------------------------

    def _resume_point(self, epoch: int) -> tuple[bytes, bytes] | None:
        try:
            saved = json.loads(self._state_path.read_text())
        except (OSError, ValueError):
            return None
        if saved.get("epoch") != epoch or saved.get("done"):
            return None
        return bytes.fromhex(saved["namespace"]), bytes.fromhex(saved["after"])

    def _save(self, epoch: int, namespace: bytes, after: bytes, *, done: bool) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "namespace": namespace.hex(), "after": after.hex(), "done": done}))
        os.replace(tmp, self._state_path)


def _member_list(epoch: int, nodes) -> MemberList:
    return MemberList.of((Member(n.node_id, n.address, n.weight or 1.0) for n in nodes), epoch=epoch)

