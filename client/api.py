"""``Client``: the asyncio SDK.

A call validates its keys and values, splits big batches into bounded chunks,
routes each key to its replicas by the cluster map (``router``), runs the
chunk against them, resuming on the next replica when a daemon fails
(``replicas``), and verifies every value it returns against the checksum its
writer computed. Values move by RMA through registered memory when the
daemon and the client both have the data plane, inline otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import grpc

from kvstore import errors
from kvstore._proto.v1 import admin_pb2, cluster_pb2, data_pb2
from kvstore.checksum import checksum
from kvstore.client import replicas
from kvstore.client.batching import by_count, by_count_and_bytes
from kvstore.client.config import ClientConfig, Deadline, RetryPolicy
from kvstore.client.regions import MemoryRegion, StagingPool, allocate_region, shared_memory_allowed
from kvstore.client.router import ClusterView, DownNodes
from kvstore.client.transport import Connection
from kvstore.protocol.status import error_from_rpc
from kvstore.extents import ExtentAllocator
from kvstore.namespace import validate_key
from kvstore.protocol.codes import ErrorCode

log = logging.getLogger("kvstore.client")

DURABILITY = {
    "memory": data_pb2.DURABILITY_MEMORY,
    "disk": data_pb2.DURABILITY_DISK,
    "sync": data_pb2.DURABILITY_SYNC,
}
_FRAMING = 4096  # protobuf overhead allowance per block when bounding a batch
TOO_BIG = "BLOCK_EXCEEDS_MEMORY_TIER"  # the daemon cannot stage it for RMA: it goes inline
EPOCH_METADATA = "kvstore-epoch"  # the map a request was routed with


def _durability(value) -> int:
    if isinstance(value, str) and value.lower() in DURABILITY:
        return DURABILITY[value.lower()]
    raise errors.InvalidArgumentError(
        f"durability {value!r} is unknown; use 'memory', 'disk' or 'sync'", code=ErrorCode.UNKNOWN_DURABILITY
    )


def _as_view(value, index: int) -> memoryview:
    if isinstance(value, str):
        raise errors.InvalidArgumentError(f"value {index} is a str; values are bytes-like", index=index)
    try:
        view = memoryview(value)
    except TypeError:
        raise errors.InvalidArgumentError(
            f"value {index} has type {type(value).__name__}, which is not bytes-like", index=index
        ) from None
    if not view.c_contiguous:
        raise errors.InvalidArgumentError(f"value {index} is not a contiguous buffer", index=index)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _same_length(keys, first, second, first_name: str, second_name: str) -> None:
    if not (len(keys) == len(first) == len(second)):
        raise errors.InvalidArgumentError(
            f"{len(keys)} keys, {len(first)} {first_name} and {len(second)} {second_name}: give one of each per key"
        )


async def _copy(fn, nbytes: int):
    """Run a memory copy, off the event loop when it is big enough to matter."""
    if nbytes >= (4 << 20):
        return await asyncio.to_thread(fn)
    return fn()


def _deadline(config: ClientConfig, deadline: Deadline | float | None) -> Deadline:
    if deadline is None:
        return config.deadline
    if isinstance(deadline, Deadline):
        return deadline
    return Deadline(float(deadline), min(config.attempt_timeout, float(deadline)))


class Client:
    """Async client of a kvstore deployment, scoped to one namespace.

    ``endpoints`` is "host:port", "h1:p1,h2:p2" or a list of those: any daemons
    of the cluster, from which the client learns the whole map.

    Every data call takes optional ``deadline`` (a ``Deadline`` or seconds)
    and ``retry`` (a ``RetryPolicy``) overriding the client's defaults.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        *,
        tenant: str | None = None,
        subtenant: str | None = None,
        config: ClientConfig | None = None,
        **settings: Any,
    ) -> None:
        overrides = dict(settings, endpoints=endpoints, tenant=tenant, subtenant=subtenant)
        if config is None:
            config = ClientConfig.load(overrides)
        else:
            config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
        self.config = config
        self.namespace = data_pb2.Namespace(tenant=config.tenant, subtenant=config.subtenant)
        self.client_id = uuid.uuid4().hex
        self._connections: dict[str, Connection] = {}  # by address
        self._hello_locks: dict[str, asyncio.Lock] = {}
        self._view: ClusterView | None = None
        self._aliases: dict[str, str] = {}  # node id -> the seed endpoint that reached it
        self._down = DownNodes()
        self._limits: cluster_pb2.HelloResponse | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._refresher: asyncio.Task | None = None
        self._refreshing: asyncio.Task | None = None
        self._stale_at = 0.0  # when a daemon last hinted that our map may be stale
        self._background: set[asyncio.Task] = set()
        self._closed = False
        self._plane = None  # (native Context, Worker) once the data plane is up
        self._plane_error: str | None = None
        self._staging: StagingPool | None = None
        self.zero_copy = False  # True once a daemon accepted our data plane
        self._slot_hint = 64 << 10  # staging slot per key for plain gets; follows observed sizes
        self.repaired = 0  # replicas rewritten by read repair

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def connect(self) -> None:
        """Reach a daemon, learn its limits and the cluster map (done lazily by the first call otherwise)."""
        if self._view is not None:
            return
        if self._closed:
            raise errors.UnavailableError("the client is closed", code=ErrorCode.SHUTTING_DOWN)
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._view is not None:
                return
            self._native_plane()
            last: errors.KVStoreError | None = None
            # First every seed once without waiting (a dead one fails at once),
            # then patiently, for daemons that are still starting.
            for endpoint, wait in [(e, False) for e in self.config.endpoints] + [(e, True) for e in self.config.endpoints]:
                conn = self._connection(endpoint)
                try:
                    hello = await self._handshake(conn, self.config.connect_timeout, wait=wait)
                except errors.KVStoreError as exc:
                    last = exc
                    continue
                self._limits = hello
                self.zero_copy = conn.zero_copy
                self._adopt(hello.cluster_map, alias=(hello.node_id, endpoint))
                self._refresher = asyncio.create_task(self._refresh_periodically())
                return
            assert last is not None
            raise errors.UnavailableError(
                f"no kvstore daemon reachable at {', '.join(self.config.endpoints)}: {last.message}",
                code=ErrorCode.ERROR_CODE_UNSPECIFIED,
            ) from last

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._background) + [t for t in (self._refresher, self._refreshing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        connections, self._connections = list(self._connections.values()), {}
        for conn in connections:
            await conn.close()
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._plane is not None:
            self._plane[1].close()
            self._plane = None

    # -- the zero-copy data plane ------------------------------------------

    def _native_plane(self):
        """(Context, Worker) of the native module, or None for inline transfers."""
        if self.config.transport == "inline" or self._plane_error is not None:
            return None
        if self._plane is None:
            try:
                from kvstore import _native
            except ImportError as exc:
                _native, reason = None, f"kvstore._native is not built ({exc})"
            else:
                reason = None if _native.available() else _native.unavailable_reason() or "UCX is unavailable"
            if reason is not None:
                self._plane_error = reason
                if self.config.transport == "ucx":
                    raise errors.UnavailableError(
                        f"transport 'ucx' asked for, but {reason}", code=ErrorCode.DATA_PLANE_UNAVAILABLE
                    )
                return None
            context = _native.Context(self.config.ucx_tls or None)
            self._plane = (context, _native.Worker(context))
        return self._plane

    async def _handshake(
        self, conn: Connection, timeout: float, *, wait: bool = False, seen: int | None = None
    ) -> cluster_pb2.HelloResponse:
        """Hello to one daemon: it learns our worker (and opens its data-plane endpoint to it).

        ``seen`` is the handshake generation a caller found broken: if another
        caller has said Hello since, that one is used (a second Hello would
        close the session the first caller's retry is already using)."""
        lock = self._hello_locks.setdefault(conn.endpoint, asyncio.Lock())
        async with lock:
            if seen is not None and conn.generation != seen and conn.hello is not None:
                return conn.hello
            worker_address = self._plane[1].address if self._plane else b""
            hello = await conn.handshake(self.client_id, timeout, worker_address, wait=wait)
        if self.config.transport == "ucx" and not conn.zero_copy:
            raise errors.UnavailableError(
                f"transport 'ucx' asked for, but the daemon at {conn.endpoint} has no zero-copy data plane",
                code=ErrorCode.DATA_PLANE_UNAVAILABLE,
            )
        if conn.zero_copy and self._staging is None:
            self._staging = StagingPool(self.allocate(self.config.staging_bytes))
        return hello

    def register(self, buffer) -> MemoryRegion:
        """Register a writable buffer (bytearray, numpy array, mmap) once for put_from/get_into.

        Returns a reusable MemoryRegion; close it (or use ``with``) when done.
        Without the native module the region still works, through inline copies.
        """
        plane = self._native_plane()
        handle = plane[0].register(buffer) if plane else None
        return MemoryRegion(buffer, handle)

    def register_ptr(self, address: int, length: int) -> MemoryRegion:
        """Register a raw range, such as an inference engine's pinned pool; the caller keeps it alive."""
        plane = self._native_plane()
        handle = plane[0].register_ptr(address, length) if plane else None
        return MemoryRegion(None, handle, address=address, length=length)

    def allocate(self, nbytes: int) -> MemoryRegion:
        """``nbytes`` of memory owned by the SDK, for put_from/get_into: fill and read
        it through ``region.buffer``. A daemon on this host maps it and copies each
        block with one memcpy (no RMA, checksums computed as it copies); other
        daemons reach it by RMA like a registered buffer, and so does every
        daemon when ``ucx_tls`` leaves shared memory out. Close it (or use
        ``with``) when done."""
        return allocate_region(nbytes, self.register, share=shared_memory_allowed(self.config.ucx_tls))

    def _connection(self, endpoint: str) -> Connection:
        conn = self._connections.get(endpoint)
        if conn is None:
            local = self.config.local_channel and shared_memory_allowed(self.config.ucx_tls)
            conn = self._connections[endpoint] = Connection(endpoint, local_channel=local)
        return conn

    @property
    def max_value_bytes(self) -> int:
        return self._limits.max_value_bytes if self._limits else 256 << 20

    @property
    def _max_batch_bytes(self) -> int:
        announced = self._limits.max_message_bytes - (1 << 20) if self._limits else self.config.max_batch_bytes
        return max(1, min(self.config.max_batch_bytes, announced))

    # -- the cluster map ---------------------------------------------------

    def _adopt(self, cluster_map: cluster_pb2.ClusterMap, alias: tuple[str, str] | None = None) -> None:
        if alias is not None:
            self._aliases[alias[0]] = alias[1]
        if not cluster_map.nodes:  # a daemon still joining: keep what we have
            if self._view is not None:
                return
            cluster_map = cluster_pb2.ClusterMap(
                epoch=0, nodes=[cluster_pb2.Node(node_id=alias[0], address=alias[1], weight=1.0)], replicas=1, write_quorum=1
            )
        if self._view is not None and self._view.epoch != cluster_map.epoch:
            log.info("cluster map epoch %d -> %d", self._view.epoch, cluster_map.epoch)
        self._view = ClusterView(cluster_map, self._aliases, prior=self._view)

    async def refresh_map(self) -> dict:
        """Re-read the cluster map from a daemon now; returns it as cluster_map() does."""
        await self.connect()
        await self._refresh_map()
        return self.cluster_map()

    async def _refresh_map(self) -> None:
        view = self._view
        nodes = self._down.prefer_up(list(view.nodes))
        for node in nodes:
            try:
                fresh = await self._node_call(
                    node, "cluster", "GetClusterMap", cluster_pb2.GetClusterMapRequest(), min(2.0, self.config.attempt_timeout)
                )
            except errors.KVStoreError as exc:
                log.debug("cluster map from %s: %s", node, exc)
                continue
            if fresh.epoch != self._view.epoch or not self._view.map.nodes:
                self._adopt(fresh)
            return

    def _map_may_be_stale(self) -> None:
        """A daemon answered with another epoch, or failed: re-read the map soon
        (in the background, at most a few times a second)."""
        self._stale_at = time.monotonic()
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_soon())

    async def _refresh_soon(self) -> None:
        await asyncio.sleep(0.05)  # let the other failures of the same moment arrive
        try:
            await self._refresh_map()
        except Exception as exc:
            log.debug("cluster map refresh failed: %s", exc)

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.map_refresh)
            try:
                await self._refresh_map()
            except Exception as exc:  # never let the refresher die
                log.debug("cluster map refresh failed: %s", exc)

    def cluster_map(self) -> dict:
        """The map this client routes by: epoch, nodes, replication."""
        view = self._view
        if view is None:
            return {}
        return {
            "epoch": view.epoch,
            "nodes": [{"node_id": n, "address": view.addresses[n]} for n in view.nodes],
            "replicas": view.default.replicas,
            "write_quorum": view.default.write_quorum,
            "moving_from": [n.node_id for n in view.map.previous_nodes],
        }

    # -- one RPC to one daemon ---------------------------------------------

    async def _node_call(self, node: str, service: str, method: str, request, timeout: float):
        """Send one RPC to ``node``; KVStoreError on failure."""
        if self._closed:
            raise errors.UnavailableError("the client is closed", code=ErrorCode.SHUTTING_DOWN)
        conn = self._connection(self._view.addresses[node])
        if conn.hello is None:
            await self._handshake(conn, timeout, seen=conn.generation)
        metadata = ((EPOCH_METADATA, str(self._view.epoch)),)
        for again in (False, True):
            generation = conn.generation
            local = await conn.local_channel() if service == "data" else None
            try:
                if local is not None:
                    response, epoch = await local.call(method, request, self._view.epoch, timeout)
                    if epoch is not None and epoch != self._view.epoch:
                        self._map_may_be_stale()
                    return response
                pending = getattr(getattr(conn, service), method)(request, timeout=timeout, metadata=metadata)
                response = await pending
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, conn.endpoint)
            except errors.KVStoreError as exc:  # from the local channel, already translated
                error = exc
            else:
                if service == "data":
                    for key, value in await pending.trailing_metadata() or ():
                        if key == EPOCH_METADATA and value != str(self._view.epoch):
                            self._map_may_be_stale()
                return response
            if error.retryable:
                self._map_may_be_stale()
            if not again and error.code in ("UNKNOWN_CLIENT", "TRANSFER_FAILED") and self._plane is not None:
                # The daemon lost our data-plane session (it restarted, or a transfer failed).
                await self._handshake(conn, timeout, seen=generation)
                continue
            raise error

    async def _call(self, service: str, method: str, request):
        """One RPC that any daemon can answer: the first that does."""
        await self.connect()
        call = self._call_context(None, None)
        last: errors.KVStoreError | None = None
        for attempt in range(1, call.retry.attempts + 1):
            if attempt > 1 and not await call.backoff(attempt):
                break
            nodes = self._down.prefer_up(list(self._view.nodes))
            for node in nodes:
                try:
                    return await self._node_call(node, service, method, request, call.attempt_timeout())
                except errors.KVStoreError as exc:
                    if not exc.retryable:
                        raise
                    self._down.mark(node)
                    last = exc
        assert last is not None
        raise last

    async def _on_every_node(self, work, nodes: Sequence[str] | None = None) -> list[tuple[str, Any]]:
        """``work(node)`` on every node at once (by default the members and the
        previous members blocks may still be on): (node, its result or the
        KVStoreError it raised) each."""
        nodes = self._view.all_nodes if nodes is None else list(nodes)

        async def one(node: str):
            try:
                return await work(node)
            except errors.KVStoreError as exc:
                return exc

        return list(zip(nodes, await asyncio.gather(*(one(n) for n in nodes))))

    @staticmethod
    def _answers(outcomes: list[tuple[str, Any]], what: str, *, tolerate: bool = True) -> list:
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

    async def _broadcast(self, service: str, method: str, request, *, tolerate: bool = True) -> list:
        """The same RPC to every node of the map (and those blocks may still be moving from)."""
        await self.connect()
        timeout = self._call_context(None, None).attempt_timeout()
        outcomes = await self._on_every_node(lambda node: self._node_call(node, service, method, request, timeout))
        return self._answers(outcomes, f"{service}.{method}", tolerate=tolerate)

    def _call_context(self, deadline: Deadline | float | None, retry: RetryPolicy | None) -> replicas.Call:
        return replicas.Call(
            deadline=_deadline(self.config, deadline),
            retry=retry or self.config.retry,
            down=self._down,
            refresh=self._refresh_map,
            concurrency=self.config.concurrency * max(1, len(self._view.nodes) if self._view else 1),
        )

    # -- routing -----------------------------------------------------------

    def _write_plan(self, keys: Sequence[bytes]):
        tenant, subtenant = self.config.tenant, self.config.subtenant

        def plan(i: int):
            view = self._view  # read at call time: a WRONG_NODE refreshes it
            order, count = view.write_order(tenant, subtenant, keys[i])
            return order, count, view.replication(tenant, subtenant).write_quorum

        return plan

    def _read_plan(self, keys: Sequence[bytes]):
        tenant, subtenant = self.config.tenant, self.config.subtenant

        def plan(i: int):
            order, count = self._view.read_order(tenant, subtenant, keys[i])
            return order, count, 0

        return plan

    async def _write(self, keys: Sequence[bytes], send, call: replicas.Call, start: int) -> None:
        try:
            await replicas.write(len(keys), self._write_plan(keys), send, call)
        except errors.KVStoreError as exc:
            if exc.index >= 0:
                exc.index += start
            raise

    async def _read(self, keys: Sequence[bytes], send, call: replicas.Call, start: int) -> replicas.ReadResult:
        """Route a read; misses found while the map was changing are asked again under the new map."""
        epoch = self._view.epoch
        try:
            result = await self._read_once(keys, send, call)
            missing = [i for i, v in enumerate(result.values) if v is None]
            if missing and self._stale_at >= call.started:
                await self._refresh_map()
                if self._view.epoch != epoch:
                    again = await self._read_once(
                        [keys[i] for i in missing],
                        lambda node, positions, timeout: send(node, [missing[p] for p in positions], timeout),
                        call,
                    )
                    for i, value, missed in zip(missing, again.values, again.missed_on):
                        result.values[i] = value
                        result.missed_on[i].extend(missed)
            return result
        except errors.KVStoreError as exc:
            if exc.index >= 0:
                exc.index += start
            raise

    async def _read_once(self, keys: Sequence[bytes], send, call: replicas.Call) -> replicas.ReadResult:
        return await replicas.read(
            len(keys), self._read_plan(keys), send, call, failures_as_miss=self.config.read_failures == "miss"
        )

    def _repair(self, keys: Sequence[bytes], values: Sequence, missed_on: list[list[str]]) -> None:
        """Write blocks back to owners that answered "not here" (a replica lost or dropped as corrupt)."""
        tenant, subtenant = self.config.tenant, self.config.subtenant
        by_node: dict[str, list[int]] = {}
        for i, (value, missed) in enumerate(zip(values, missed_on)):
            if value is None or not missed:
                continue
            order, count = self._view.write_order(tenant, subtenant, keys[i])
            for node in missed:
                if node in order[:count]:
                    by_node.setdefault(node, []).append(i)
        for node, positions in by_node.items():
            batch_keys = [keys[i] for i in positions]
            batch_values = [memoryview(values[i]) for i in positions]
            task = asyncio.create_task(self._repair_node(node, batch_keys, batch_values))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _repair_node(self, node: str, keys: list[bytes], values: list[memoryview]) -> None:
        level = _durability(self.config.default_durability)
        try:
            await self._put_inline(node, keys, values, level, self.config.attempt_timeout)
        except errors.KVStoreError as exc:
            log.debug("read repair of %d blocks on %s failed: %s", len(keys), node, exc)
            return
        self.repaired += len(keys)
        log.info("read repair: %d blocks rewritten on %s", len(keys), node)

    # -- writes ------------------------------------------------------------

    async def put(self, key: bytes, value, durability: str | None = None, **options) -> None:
        """Store one block; returns once it reached ``durability`` ("memory", "disk", "sync")."""
        await self.put_many([(key, value)], durability=durability, **options)

    async def put_many(
        self,
        items: Iterable[tuple[bytes, Any]] | Mapping[bytes, Any],
        durability: str | None = None,
        *,
        deadline: Deadline | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> int:
        """Store many blocks on their replicas; returns how many were stored."""
        level = _durability(durability or self.config.default_durability)
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        await self.connect()
        limit = self.max_value_bytes
        keys, views = [], []
        for i, pair in enumerate(pairs):
            try:
                key, value = pair
            except (TypeError, ValueError):
                raise errors.InvalidArgumentError(f"item {i} is not a (key, value) pair", index=i) from None
            keys.append(validate_key(key, i))
            view = _as_view(value, i)
            if view.nbytes > limit:
                raise errors.InvalidArgumentError(
                    f"value {i} is {view.nbytes} bytes; the daemon's limit is {limit}", code=ErrorCode.VALUE_TOO_LARGE, index=i
                )
            views.append(view)
        call = self._call_context(deadline, retry)
        sizes = [v.nbytes for v in views]
        ranges = list(by_count_and_bytes(sizes, self.config.max_batch_keys, self._max_batch_bytes))
        calls = (self._put_staged(keys[a:b], views[a:b], level, call, a) for a, b in ranges)
        return sum(await self._bounded(calls))

    async def _put_staged(self, keys, views, level: int, call: replicas.Call, start: int) -> int:
        """Copy values into the registered staging pool once; every replica RMA-reads them from there."""
        sizes = [v.nbytes for v in views]
        total = sum(ExtentAllocator.rounded(n) for n in sizes)
        base = await self._staging.acquire(total) if self.zero_copy and self._staging else None
        if base is None:  # inline, or larger than the whole pool
            return await self._put_routed(keys, views.__getitem__, None, level, call, start)
        try:
            offsets = []
            cursor = base
            for n in sizes:
                offsets.append(cursor)
                cursor += ExtentAllocator.rounded(n)
            region = self._staging.region
            await _copy(lambda: [region.view(o, v.nbytes).__setitem__(slice(None), v) for o, v in zip(offsets, views)], total)
            checksums = region.checksums(offsets, sizes)
            return await self._put_routed(keys, views.__getitem__, (region, offsets, sizes, checksums), level, call, start)
        finally:
            await self._staging.release(base, total)

    async def _put_routed(self, keys, view_of, staged, level: int, call: replicas.Call, start: int) -> int:
        """Write one chunk to its replicas: by RMA from ``staged`` (region, offsets,
        sizes, checksums) where the daemon has the data plane, inline otherwise."""

        async def send(node: str, positions: list[int], timeout: float) -> list[bool]:
            sub = [keys[p] for p in positions]
            if staged is not None and region_ok(node):
                region, offsets, sizes, checksums = staged
                done = await self._put_region(
                    node, sub, region, [offsets[p] for p in positions], [sizes[p] for p in positions],
                    [checksums[p] for p in positions], level, timeout,
                )
                if done:
                    return [True] * len(positions)
            await self._put_inline(node, sub, [view_of(p) for p in positions], level, timeout)
            return [True] * len(positions)

        def region_ok(node: str) -> bool:
            conn = self._connections.get(self._view.addresses[node])
            return conn is None or conn.hello is None or conn.zero_copy

        await self._write(keys, send, call, start)
        return len(keys)

    async def _put_inline(self, node: str, keys, views, level: int, timeout: float) -> None:
        blocks = []
        for key, view in zip(keys, views):
            data = view.tobytes() if not isinstance(view.obj, bytes) or view.nbytes != len(view.obj) else view.obj
            blocks.append(data_pb2.BlockWrite(key=key, value=data, length=len(data), checksum=checksum(data)))
        request = data_pb2.PutRequest(namespace=self.namespace, blocks=blocks, durability=level)
        await self._node_call(node, "data", "Put", request, timeout)

    async def _put_region(self, node: str, keys, region: MemoryRegion, offsets, sizes, checksums, level: int, timeout: float) -> bool:
        """A zero-copy Put; False when the daemon cannot stage the blocks (send them inline)."""
        omitted = region.daemon_checksums  # shared memory: the daemon hashes as it copies
        if not omitted:
            checksums = [region.checksum(o, n) if c is None else c for o, n, c in zip(offsets, sizes, checksums)]
        wire = region.wire()
        wire.shared_memory.checksums_omitted = omitted
        request = data_pb2.PutRequest(
            namespace=self.namespace,
            durability=level,
            client_id=self.client_id,
            region=wire,
            blocks=[
                data_pb2.BlockWrite(key=k, length=n, checksum=0 if omitted else c, remote_address=region.address + o)
                for k, o, n, c in zip(keys, offsets, sizes, checksums)
            ],
        )
        try:
            await self._node_call(node, "data", "Put", request, timeout)
        except errors.ResourceExhaustedError as exc:
            if exc.code != TOO_BIG:
                raise
            return False
        except errors.InvalidArgumentError as exc:
            if not omitted or exc.code != "SHARED_MEMORY_UNAVAILABLE":
                raise
            region.daemon_checksums = False  # that daemon reads it by RMA: it needs our checksums
            return await self._put_region(node, keys, region, offsets, sizes, checksums, level, timeout)
        return True

    async def put_from(
        self,
        keys: Sequence[bytes],
        region: MemoryRegion,
        offsets: Sequence[int],
        sizes: Sequence[int],
        durability: str | None = None,
        *,
        deadline: Deadline | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> int:
        """Store blocks that lie in a registered region; every replica reads them by RMA.

        Returns how many were stored. With no zero-copy path to a daemon the
        bytes travel inline instead, with the same result.
        """
        level = _durability(durability or self.config.default_durability)
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        _same_length(keys, offsets, sizes, "offsets", "sizes")
        await self.connect()
        limit = self.max_value_bytes
        for i, (offset, size) in enumerate(zip(offsets, sizes)):
            region.check(offset, size, i)
            if size > limit:
                raise errors.InvalidArgumentError(
                    f"value {i} is {size} bytes; the daemon's limit is {limit}", code=ErrorCode.VALUE_TOO_LARGE, index=i
                )
        call = self._call_context(deadline, retry)
        ranges = list(by_count_and_bytes(list(sizes), self.config.max_batch_keys, self._max_batch_bytes))
        zero_copy = self.zero_copy and region.zero_copy
        checksums = region.checksums(offsets, sizes) if zero_copy else None

        async def chunk(a: int, b: int) -> int:
            offs, lens = list(offsets[a:b]), list(sizes[a:b])
            staged = (region, offs, lens, checksums[a:b]) if zero_copy else None
            return await self._put_routed(keys[a:b], lambda p: region.view(offs[p], lens[p]), staged, level, call, a)

        return sum(await self._bounded(chunk(a, b) for a, b in ranges))

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Delete blocks from every node that holds them; returns how many existed.

        Raises UnavailableError when an owner of a key could not be reached
        (its copy would come back when it does)."""
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        await self.connect()
        existed: set[bytes] = set()
        for _, chunk in by_count(keys, self.config.max_batch_keys):
            view = self._view
            request = data_pb2.KeysRequest(namespace=self.namespace, keys=chunk)
            timeout = self._call_context(None, None).attempt_timeout()
            owners: set[str] = set()
            for key in chunk:
                order, count = view.write_order(self.config.tenant, self.config.subtenant, key)
                owners.update(order[:count])
            outcomes = await self._on_every_node(lambda node: self._node_call(node, "data", "Delete", request, timeout))
            for node, result in outcomes:
                if isinstance(result, errors.KVStoreError):
                    if not result.retryable or node in owners:
                        raise result
                    continue
                existed.update(k for k, e in zip(chunk, result.existed) if e)
        return len(existed)

    # -- reads -------------------------------------------------------------

    async def get(self, key: bytes, **options) -> bytes | None:
        """The block's bytes, or None when it is not stored."""
        return (await self.get_many([key], **options))[0]

    async def get_many(
        self, keys: Sequence[bytes], *, deadline: Deadline | float | None = None, retry: RetryPolicy | None = None
    ) -> list[bytes | None]:
        """Blocks in the order of ``keys``; None for each miss."""
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        await self.connect()
        call = self._call_context(deadline, retry)
        if self.zero_copy and self._staging is not None:
            slot = ExtentAllocator.rounded(self._slot_hint)
            per_call = max(1, min(self.config.max_batch_keys, self._max_batch_bytes // slot))
            chunks = list(by_count(keys, per_call))
            parts = await self._bounded(self._get_staged(start, chunk, slot, call) for start, chunk in chunks)
        else:
            chunks = list(by_count(keys, self.config.max_batch_keys))
            parts = await self._bounded(self._get_values(start, chunk, call) for start, chunk in chunks)
        return [value for part in parts for value in part]

    async def _get_staged(self, start: int, keys, slot: int, call: replicas.Call) -> list[bytes | None]:
        """Let a replica RMA-write blocks into staging slots, then copy them out."""
        base = await self._staging.acquire(slot * len(keys))
        if base is None:
            return await self._get_values(start, keys, call)
        region = self._staging.region
        try:
            offsets = [base + j * slot for j in range(len(keys))]
            result = await self._read_into(keys, region, offsets, [slot] * len(keys), call, start)
            out: list[bytes | None] = []
            larger: list[int] = []
            for j, length in enumerate(result.values):
                if length is None:
                    out.append(None)
                elif length < 0:
                    out.append(None)
                    larger.append(j)
                else:
                    out.append(bytes(region.view(offsets[j], length)))
        finally:
            await self._staging.release(base, slot * len(keys))
        self._repair(keys, out, result.missed_on)
        seen = [len(v) for v in out if v is not None]
        if seen or larger:
            self._slot_hint = max(seen, default=self._slot_hint)
        for j in larger:  # blocks larger than the slot guess: ask again, sized exactly
            out[j] = await self._get_one_exact(keys[j], start + j, call)
        return out

    async def _get_one_exact(self, key: bytes, position: int, call: replicas.Call) -> bytes | None:
        size = self._slot_hint
        for _ in range(2):  # the block may be overwritten by a larger one in between
            base = await self._staging.acquire(size)
            if base is None:
                break
            try:
                result = await self._read_into([key], self._staging.region, [base], [size], call, position)
                length = result.values[0]
                if length is not None and length >= 0:
                    return bytes(self._staging.region.view(base, length))
            finally:
                await self._staging.release(base, size)
            if length is None:
                return None
            size = -length
        return (await self._get_values(position, [key], call))[0]

    async def _read_into(self, keys, region: MemoryRegion, offsets, capacities, call: replicas.Call, start: int):
        """Route a read whose blocks land in ``region``: per key its length, None
        on a miss, or ``-length`` when it did not fit its slot."""

        async def send(node: str, positions: list[int], timeout: float) -> list[int | None]:
            sub = [keys[p] for p in positions]
            offs = [offsets[p] for p in positions]
            caps = [capacities[p] for p in positions]
            conn = self._connections.get(self._view.addresses[node])
            if region.zero_copy and (conn is None or conn.hello is None or conn.zero_copy):
                return await self._get_region(node, sub, region, offs, caps, timeout)
            return await self._get_inline_into(node, sub, region, offs, caps, timeout)

        return await self._read(keys, send, call, start)

    async def _get_region(self, node: str, keys, region: MemoryRegion, offsets, capacities, timeout: float) -> list[int | None]:
        """One zero-copy Get from ``node``. Checksums are verified over the
        region's bytes; a mismatch is asked for once more, then raised."""
        request = data_pb2.GetRequest(
            namespace=self.namespace,
            keys=keys,
            client_id=self.client_id,
            region=region.wire(),
            slots=[data_pb2.RemoteSlot(address=region.address + o, capacity=c) for o, c in zip(offsets, capacities)],
        )
        for attempt in (1, 2):
            try:
                response = await self._node_call(node, "data", "Get", request, timeout)
            except errors.ResourceExhaustedError as exc:
                if exc.code != TOO_BIG:
                    raise
                return await self._get_inline_into(node, keys, region, offsets, capacities, timeout)
            if len(response.results) != len(keys):
                raise errors.InternalError(f"the daemon answered {len(response.results)} of {len(keys)} keys")
            out: list[int | None] = []
            corrupt = None
            # Over shared memory the daemon verified each block while it copied it.
            verify = self.config.verify_checksums and not response.shared_memory
            for j, (result, offset) in enumerate(zip(response.results, offsets)):
                if not result.found:
                    out.append(None)
                elif result.too_small:
                    out.append(-result.length)
                else:
                    if verify and region.checksum(offset, result.length) != result.checksum:
                        corrupt = j
                    out.append(result.length)
            if corrupt is None:
                return out
            log.warning("block %d failed its checksum in transit from %s; asking again", corrupt, node)
        raise errors.DataCorruptionError(f"block {corrupt} failed its checksum twice in transit from {node}", index=corrupt)

    async def _get_inline_into(self, node: str, keys, region: MemoryRegion, offsets, capacities, timeout: float) -> list[int | None]:
        """Blocks that travel inline (no data plane, or too large for the daemon to stage), then land in the region."""
        out: list[int | None] = []
        for value, offset, capacity in zip(await self._get_chunk(node, keys, timeout), offsets, capacities):
            if value is None:
                out.append(None)
            elif len(value) > capacity:
                out.append(-len(value))
            else:
                region.view(offset, len(value))[:] = value
                out.append(len(value))
        return out

    async def get_into(
        self,
        keys: Sequence[bytes],
        region: MemoryRegion,
        offsets: Sequence[int],
        capacities: Sequence[int],
        *,
        deadline: Deadline | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> list[int | None]:
        """Fetch blocks straight into a registered region (a replica writes them by RMA).

        Returns the bytes written per key, None for a miss. A block larger than its
        capacity raises InvalidArgumentError (code BUFFER_TOO_SMALL) naming its index.
        """
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        _same_length(keys, offsets, capacities, "offsets", "capacities")
        for i, (offset, capacity) in enumerate(zip(offsets, capacities)):
            region.check(offset, capacity, i)
        await self.connect()
        call = self._call_context(deadline, retry)

        async def chunk(start: int, idx: Sequence[int]) -> list[int | None]:
            sub = [keys[i] for i in idx]
            offs = [offsets[i] for i in idx]
            result = await self._read_into(sub, region, offs, [capacities[i] for i in idx], call, start)
            if any(result.missed_on):
                values = [
                    bytes(region.view(o, n)) if n is not None and n >= 0 and missed else None
                    for o, n, missed in zip(offs, result.values, result.missed_on)
                ]
                self._repair(sub, values, result.missed_on)
            return result.values

        parts = await self._bounded(chunk(start, idx) for start, idx in by_count(list(range(len(keys))), self.config.max_batch_keys))
        results = [r for part in parts for r in part]
        for i, result in enumerate(results):
            if result is not None and result < 0:
                raise errors.InvalidArgumentError(
                    f"block {i} is {-result} bytes but its slot holds {capacities[i]}", code=ErrorCode.BUFFER_TOO_SMALL, index=i
                )
        return results

    async def _get_values(self, start: int, keys: Sequence[bytes], call: replicas.Call) -> list[bytes | None]:
        """Route an inline read of ``keys``; values come back in the responses."""

        async def send(node: str, positions: list[int], timeout: float) -> list[bytes | None]:
            return await self._get_chunk(node, [keys[p] for p in positions], timeout)

        result = await self._read(keys, send, call, start)
        self._repair(keys, result.values, result.missed_on)
        return result.values

    async def _get_chunk(self, node: str, keys: Sequence[bytes], timeout: float) -> list[bytes | None]:
        out: list[bytes | None] = []
        retried: set[int] = set()
        while len(out) < len(keys):
            request = data_pb2.GetRequest(namespace=self.namespace, keys=keys[len(out) :])
            response = await self._node_call(node, "data", "Get", request, timeout)
            if not response.results:
                raise errors.InternalError("the daemon answered a Get with no results")
            for result in response.results:
                position = len(out)
                if not result.found:
                    out.append(None)
                    continue
                value = result.value
                if self.config.verify_checksums and (len(value) != result.length or checksum(value) != result.checksum):
                    if position in retried:
                        raise errors.DataCorruptionError(
                            f"block {position} failed its checksum twice in transit from {node}", index=position
                        )
                    retried.add(position)
                    log.warning("block %d failed its checksum in transit from %s; asking again", position, node)
                    break  # re-ask from this key on
                out.append(value)
        return out

    async def exists(
        self, keys: Sequence[bytes], *, deadline: Deadline | float | None = None, retry: RetryPolicy | None = None
    ) -> list[bool]:
        """For each key, whether a block is stored under it."""
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        await self.connect()
        call = self._call_context(deadline, retry)
        parts = await self._bounded(self._exists_chunk(start, chunk, call) for start, chunk in by_count(keys, self.config.max_batch_keys))
        return [e for part in parts for e in part]

    async def _exists_chunk(self, start: int, keys: Sequence[bytes], call: replicas.Call) -> list[bool]:
        async def send(node: str, positions: list[int], timeout: float) -> list[bool | None]:
            request = data_pb2.KeysRequest(namespace=self.namespace, keys=[keys[p] for p in positions])
            response = await self._node_call(node, "data", "Exists", request, timeout)
            return [True if e else None for e in response.exists]

        result = await self._read(keys, send, call, start)
        return [bool(v) for v in result.values]

    async def lookup_prefix(
        self, keys: Sequence[bytes], *, deadline: Deadline | float | None = None, retry: RetryPolicy | None = None
    ) -> int:
        """How many leading keys, in order, are stored (the scheduler's prefix-cache hit)."""
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        await self.connect()
        call = self._call_context(deadline, retry)
        total = 0
        for start, chunk in by_count(keys, self.config.max_batch_keys):
            present = await self._exists_chunk(start, chunk, call)
            count = present.index(False) if False in present else len(present)
            total += count
            if count < len(chunk):
                break
        return total

    async def list(self, prefix: bytes = b"", *, limit: int | None = None) -> list[tuple[bytes, int]]:
        """(key, length) of stored blocks whose key starts with ``prefix``, in key order, across the cluster."""
        if not isinstance(prefix, bytes):
            raise errors.InvalidArgumentError("prefix must be bytes")
        await self.connect()
        timeout = self._call_context(None, None).attempt_timeout()

        async def pages(node: str) -> list[tuple[bytes, int]]:
            out: list[tuple[bytes, int]] = []
            after = b""
            while limit is None or len(out) < limit:
                page = 1000 if limit is None else min(1000, limit - len(out))
                request = data_pb2.ListRequest(namespace=self.namespace, prefix=prefix, start_after=after, limit=page)
                response = await self._node_call(node, "data", "List", request, timeout)
                out.extend((e.key, e.length) for e in response.entries)
                if not response.truncated or not response.entries:
                    break
                after = response.entries[-1].key
            return out

        merged: dict[bytes, int] = {}
        for answer in self._answers(await self._on_every_node(pages), "data.List"):
            merged.update(answer)
        entries = sorted(merged.items())
        return entries if limit is None else entries[:limit]

    async def stat(self) -> dict:
        """Blocks and bytes stored in this client's namespace, summed over the
        nodes that answered (each replica counts)."""
        responses = await self._broadcast("data", "Stat", data_pb2.StatRequest(namespace=self.namespace))
        return {
            "tenant": self.config.tenant,
            "subtenant": self.config.subtenant,
            "blocks": sum(r.stats.blocks for r in responses),
            "bytes": sum(r.stats.bytes for r in responses),
            "nodes": len(responses),
        }

    # -- admin -------------------------------------------------------------

    async def server_stats(self) -> dict:
        """Daemon-wide statistics of one daemon: tiers, namespaces, uptime, cluster view."""
        return _server_stats(await self._call("admin", "ServerStats", admin_pb2.ServerStatsRequest()))

    async def cluster_stats(self) -> list[dict]:
        """server_stats() of every node of the map; a node that does not answer
        is listed with ``"up": False`` and the error."""
        await self.connect()
        view = self._view
        timeout = min(2.0, self.config.attempt_timeout)

        async def stats(node: str) -> dict:
            return _server_stats(await self._node_call(node, "admin", "ServerStats", admin_pb2.ServerStatsRequest(), timeout))

        return [
            {"node_id": node, "address": view.addresses[node], "up": False, "error": result.message}
            if isinstance(result, errors.KVStoreError)
            else {**result, "up": True}
            for node, result in await self._on_every_node(stats, view.nodes)
        ]

    async def set_replication(self, replicas: int, write_quorum: int = 0) -> dict:
        """Replicas and write quorum of this client's namespace on every node
        (replicas 0 returns it to the cluster default; write_quorum 0 = a majority)."""
        policy = cluster_pb2.NamespacePolicy(namespace=self.namespace, replicas=replicas, write_quorum=write_quorum)
        responses = await self._broadcast(
            "admin", "SetNamespacePolicy", admin_pb2.SetNamespacePolicyRequest(policy=policy), tolerate=False
        )
        await self._refresh_map()
        applied = responses[0]
        return {"replicas": applied.replicas, "write_quorum": applied.write_quorum}

    async def replication(self) -> dict:
        """Replicas and write quorum this client's namespace is written with."""
        await self.connect()
        r = self._view.replication(self.config.tenant, self.config.subtenant)
        return {"replicas": r.replicas, "write_quorum": r.write_quorum}

    async def namespaces(self, tenant: str = "") -> list[dict]:
        merged: dict[tuple[str, str], dict] = {}
        for r in await self._broadcast("admin", "ListNamespaces", admin_pb2.ListNamespacesRequest(tenant=tenant)):
            for n in r.namespaces:
                entry = merged.setdefault(
                    (n.namespace.tenant, n.namespace.subtenant),
                    {"tenant": n.namespace.tenant, "subtenant": n.namespace.subtenant, "blocks": 0, "bytes": 0},
                )
                entry["blocks"] += n.blocks
                entry["bytes"] += n.bytes
        return [merged[k] for k in sorted(merged)]

    async def drop_namespace(self) -> dict:
        """Delete every block of this client's namespace at once, on every node."""
        responses = await self._broadcast(
            "admin", "DropNamespace", admin_pb2.DropNamespaceRequest(namespace=self.namespace), tolerate=False
        )
        return {"blocks": sum(r.blocks for r in responses), "bytes": sum(r.bytes for r in responses)}

    # -- helpers -----------------------------------------------------------

    async def _bounded(self, calls) -> list:
        """Run coroutines with at most ``config.concurrency`` in flight; results in order."""
        calls = list(calls)
        if len(calls) == 1:
            return [await calls[0]]
        gate = asyncio.Semaphore(self.config.concurrency)

        async def gated(coro):
            async with gate:
                return await coro

        tasks = [asyncio.ensure_future(gated(c)) for c in calls]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


def _server_stats(r: admin_pb2.ServerStatsResponse) -> dict:
    rebalance = r.rebalance
    return {
        "node_id": r.node_id,
        "address": r.address,
        "data_dir": r.data_dir,
        "version": r.version,
        "uptime_seconds": r.uptime_seconds,
        "tiers": {
            t.name: {"blocks": t.blocks, "bytes": t.bytes, "capacity_bytes": t.capacity_bytes, "resident_bytes": t.resident_bytes}
            for t in r.tiers
        },
        "namespaces": r.namespaces,
        "corrupt_blocks": r.corrupt_blocks,
        "evictions": r.evictions,
        "requests": r.requests,
        "data_plane": {"enabled": r.data_plane, "ucx_tls": r.ucx_tls, "clients": r.data_plane_clients},
        "arena_used_bytes": r.arena_used_bytes,
        "cluster": {"epoch": r.cluster_epoch, "nodes": r.cluster_nodes, "membership": r.membership},
        "rebalance": {
            "state": rebalance.state or "idle",
            "epoch": rebalance.epoch,
            "keys_scanned": rebalance.keys_scanned,
            "keys_total": rebalance.keys_total,
            "keys_copied": rebalance.keys_copied,
            "bytes_copied": rebalance.bytes_copied,
            "keys_dropped": rebalance.keys_dropped,
            "errors": rebalance.errors,
            "last_error": rebalance.last_error,
        },
    }
