"""The client's copy of the cluster map, and calling a node of it by id.

The map is learnt from the first seed daemon that answers ``Hello``, re-read
every ``map_refresh`` seconds, and re-read soon (in the background, at most a
few times a second) whenever a daemon answers with another epoch or fails. It
answers, per key, where writes and reads go (``Plan``s for the replica
engines), and sends one RPC to a node by its id: to the address the map
gives, with the map's epoch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Sequence

from kvstore import errors
from kvstore._proto.v1 import cluster_pb2
from kvstore.client.config import ClientConfig, Deadline, RetryPolicy
from kvstore.client.nodes import Nodes
from kvstore.client.replicas import Call, Plan
from kvstore.client.router import ClusterView, DownNodes
from kvstore.protocol.codes import ErrorCode

log = logging.getLogger("kvstore.client")

# Failures of one moment arrive together: a refresh they ask for waits this long first.
REFRESH_SETTLE = 0.05


class MapCache:
    def __init__(self, config: ClientConfig, nodes: Nodes) -> None:
        self.config = config
        self.nodes = nodes
        self.tenant, self.subtenant = config.tenant, config.subtenant
        self.view: ClusterView | None = None
        self.down = DownNodes()
        self._aliases: dict[str, str] = {}  # node id -> the seed endpoint that reached it
        self._connect_lock: asyncio.Lock | None = None
        self._refresher: asyncio.Task | None = None
        self._refreshing: asyncio.Task | None = None
        self._stale_at = 0.0  # when a daemon last hinted that our map may be stale
        self._sole_plans: tuple[Plan, Plan] | None = None

    # -- learning the map ----------------------------------------------------

    async def connect(self) -> None:
        """Reach a seed daemon and adopt its map (once; later calls return at once)."""
        if self.view is not None:
            return
        if self.nodes.closed:
            raise errors.UnavailableError("the client is closed", code=ErrorCode.SHUTTING_DOWN)
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self.view is not None:
                return
            self.nodes.native_plane()
            last: errors.KVStoreError | None = None
            seeds = self.config.endpoints
            # First every seed once without waiting (a dead one fails at once),
            # then patiently, for daemons that are still starting.
            for endpoint, wait in [(e, False) for e in seeds] + [(e, True) for e in seeds]:
                try:
                    hello = await self.nodes.hello(endpoint, self.config.connect_timeout, wait=wait)
                except errors.PermissionDeniedError:
                    raise  # a daemon answered: the credential is wrong, and every daemon of a cluster says so
                except errors.KVStoreError as exc:
                    last = exc
                    continue
                self.adopt(hello.cluster_map, alias=(hello.node_id, endpoint))
                self._refresher = asyncio.create_task(self._refresh_periodically())
                return
            assert last is not None
            raise errors.UnavailableError(
                f"no kvstore daemon reachable at {', '.join(seeds)}: {last.message}",
                code=ErrorCode.ERROR_CODE_UNSPECIFIED,
            ) from last

    def adopt(self, cluster_map: cluster_pb2.ClusterMap, alias: tuple[str, str] | None = None) -> None:
        if alias is not None:
            self._aliases[alias[0]] = alias[1]
        if not cluster_map.nodes:  # a daemon still joining: keep what we have
            if self.view is not None:
                return
            cluster_map = cluster_pb2.ClusterMap(
                epoch=0, nodes=[cluster_pb2.Node(node_id=alias[0], address=alias[1], weight=1.0)], replicas=1, write_quorum=1
            )
        if self.view is not None and self.view.epoch != cluster_map.epoch:
            log.info("cluster map epoch %d -> %d", self.view.epoch, cluster_map.epoch)
        self.view = ClusterView(cluster_map, self._aliases, prior=self.view)
        # A cluster of one with nothing moving (the embedded default): every key has the same plans.
        sole = self.view.sole_node
        self._sole_plans = (Plan((sole,), 1, 1), Plan((sole,), 1)) if sole is not None else None

    async def refresh(self) -> None:
        """Re-read the map from the first node that answers (down nodes last)."""
        timeout = min(2.0, self.config.attempt_timeout)
        for node in self.down.prefer_up(list(self.view.nodes)):
            try:
                fresh = await self.call(node, "cluster", "GetClusterMap", cluster_pb2.GetClusterMapRequest(), timeout)
            except errors.KVStoreError as exc:
                log.debug("cluster map from %s: %s", node, exc)
                continue
            if fresh.epoch != self.view.epoch or not self.view.map.nodes:
                self.adopt(fresh)
            return

    def changed_since(self, moment: float) -> bool:
        """Whether a daemon hinted at a newer map since ``moment`` (time.monotonic)."""
        return self._stale_at >= moment

    def _may_be_stale(self) -> None:
        self._stale_at = time.monotonic()
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_soon())

    async def _refresh_soon(self) -> None:
        await asyncio.sleep(REFRESH_SETTLE)
        try:
            await self.refresh()
        except Exception as exc:
            log.debug("cluster map refresh failed: %s", exc)

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.map_refresh)
            try:
                await self.refresh()
            except Exception as exc:  # never let the refresher die
                log.debug("cluster map refresh failed: %s", exc)

    async def close(self) -> None:
        tasks = [t for t in (self._refresher, self._refreshing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- where keys go ---------------------------------------------------------

    def write_plan(self, key: bytes) -> Plan:
        if self._sole_plans is not None:
            return self._sole_plans[0]
        view = self.view  # read at call time: a WRONG_NODE refreshes it
        order, count = view.write_order(self.tenant, self.subtenant, key)
        return Plan(order, count, view.replication(self.tenant, self.subtenant).write_quorum)

    def read_plan(self, key: bytes) -> Plan:
        if self._sole_plans is not None:
            return self._sole_plans[1]
        order, count = self.view.read_order(self.tenant, self.subtenant, key)
        return Plan(order, count)

    def owners(self, key: bytes) -> Sequence[str]:
        order, count = self.view.write_order(self.tenant, self.subtenant, key)
        return order[:count]

    def new_call(self, deadline: Deadline | float | None = None, retry: RetryPolicy | None = None) -> Call:
        """The budget of one SDK call: its deadline and retry policy (the client's
        defaults unless given), and how many RPCs it may run at once."""
        if deadline is None:
            deadline = self.config.deadline
        elif not isinstance(deadline, Deadline):
            deadline = Deadline(float(deadline), min(self.config.attempt_timeout, float(deadline)))
        return Call(
            deadline=deadline,
            retry=retry or self.config.retry,
            down=self.down,
            concurrency=self.config.concurrency * max(1, len(self.view.nodes) if self.view else 1),
        )

    # -- calling nodes -----------------------------------------------------------

    async def call(self, node: str, service: str, method: str, request, timeout: float):
        """One RPC to ``node`` under the current map; KVStoreError on failure.
        A failure, or an answer under another epoch, has the map re-read soon."""
        view = self.view
        try:
            response, epoch = await self.nodes.call(view.addresses[node], service, method, request, timeout, view.epoch)
        except errors.KVStoreError as exc:
            if exc.retryable:
                self._may_be_stale()
            raise
        if epoch is not None and epoch != view.epoch:
            self._may_be_stale()
        return response

    async def any_node(self, service: str, method: str, request):
        """One RPC that any daemon can answer: the first that does."""
        await self.connect()
        call = self.new_call()
        last: errors.KVStoreError | None = None
        for attempt in range(1, call.retry.attempts + 1):
            if attempt > 1 and not await call.backoff(attempt):
                break
            for node in self.down.prefer_up(list(self.view.nodes)):
                try:
                    return await self.call(node, service, method, request, call.attempt_timeout())
                except errors.KVStoreError as exc:
                    if not exc.retryable:
                        raise
                    self.down.mark(node)
                    last = exc
        assert last is not None
        raise last

    async def every_node(
        self, work: Callable[[str], Awaitable[Any]], nodes: Sequence[str] | None = None
    ) -> list[tuple[str, Any]]:
        """``work(node)`` on every node at once (by default the members and the
        previous members blocks may still be on): (node, its result or the
        KVStoreError it raised) each."""
        nodes = self.view.all_nodes if nodes is None else list(nodes)

        async def one(node: str):
            try:
                return await work(node)
            except errors.KVStoreError as exc:
                return exc

        return list(zip(nodes, await asyncio.gather(*(one(n) for n in nodes))))

    async def broadcast(self, service: str, method: str, request, *, tolerate: bool = True) -> list:
        """The same RPC to every node of the map (and those blocks may still be moving from)."""
        await self.connect()
        timeout = self.new_call().attempt_timeout()
        outcomes = await self.every_node(lambda node: self.call(node, service, method, request, timeout))
        return answers(outcomes, f"{service}.{method}", tolerate=tolerate)

    def describe(self) -> dict:
        """The map this client routes by: epoch, nodes, replication."""
        view = self.view
        if view is None:
            return {}
        return {
            "epoch": view.epoch,
            "nodes": [{"node_id": n, "address": view.addresses[n]} for n in view.nodes],
            "replicas": view.default.replicas,
            "write_quorum": view.default.write_quorum,
            "moving_from": [n.node_id for n in view.map.previous_nodes],
        }


def answers(outcomes: list[tuple[str, Any]], what: str, *, tolerate: bool = True) -> list:
    """The results of the nodes that answered; raise when none did, when an
    error was not retryable, or (without ``tolerate``) on any failure."""
    failures = [r for _, r in outcomes if isinstance(r, errors.KVStoreError)]
    for failure in failures:
        if not failure.retryable or not tolerate:
            raise failure
    if failures and len(failures) == len(outcomes):
        raise failures[0]
    if failures:
        log.warning("%s: %d of %d nodes did not answer", what, len(failures), len(outcomes))
    return [r for _, r in outcomes if not isinstance(r, errors.KVStoreError)]
