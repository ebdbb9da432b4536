"""``Client``: the asyncio SDK.

A call validates its keys and values, splits big batches into bounded RPCs,
sends them to a daemon (failing over to the next endpoint on a retryable
error, under the client's RetryPolicy), and verifies every value it returns
against the checksum its writer computed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import grpc

from kvstore import errors
from kvstore._proto.v1 import admin_pb2, cluster_pb2, data_pb2
from kvstore.checksum import checksum
from kvstore.client.batching import by_count, by_count_and_bytes
from kvstore.client.config import ClientConfig
from kvstore.client.regions import MemoryRegion, StagingPool, anonymous_buffer
from kvstore.client.transport import Connection, translate
from kvstore.extents import ExtentAllocator
from kvstore.namespace import validate_key

log = logging.getLogger("kvstore.client")

DURABILITY = {
    "memory": data_pb2.DURABILITY_MEMORY,
    "disk": data_pb2.DURABILITY_DISK,
    "sync": data_pb2.DURABILITY_SYNC,
}
_FRAMING = 4096  # protobuf overhead allowance per block when bounding a batch
TOO_BIG = "BLOCK_EXCEEDS_MEMORY_TIER"  # the daemon cannot stage it for RMA: it goes inline


def _durability(value) -> int:
    if isinstance(value, str) and value.lower() in DURABILITY:
        return DURABILITY[value.lower()]
    raise errors.InvalidArgumentError(
        f"durability {value!r} is unknown; use 'memory', 'disk' or 'sync'", code="UNKNOWN_DURABILITY"
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


class Client:
    """Async client of a kvstore deployment, scoped to one namespace.

    ``endpoints`` is "host:port", "h1:p1,h2:p2" or a list of those.
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
        self._connections: dict[str, Connection] = {}
        self._preferred = 0
        self._limits: cluster_pb2.HelloResponse | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._closed = False
        self._plane = None  # (native Context, Worker) once the data plane is up
        self._plane_error: str | None = None
        self._staging: StagingPool | None = None
        self.zero_copy = False  # True once a daemon accepted our data plane
        self._slot_hint = 64 << 10  # staging slot per key for plain gets; follows observed sizes

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def connect(self) -> None:
        """Reach a daemon and learn its limits (done lazily by the first call otherwise)."""
        if self._limits is not None:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._limits is not None:
                return
            plane = self._native_plane()
            worker_address = plane[1].address if plane else b""
            last: errors.KVStoreError | None = None
            for i, endpoint in enumerate(self.config.endpoints):
                conn = self._connection(endpoint)
                try:
                    hello = await conn.handshake(self.client_id, self.config.connect_timeout, worker_address)
                except errors.KVStoreError as exc:
                    last = exc
                    continue
                self._preferred = i
                self._start_data_plane(hello)
                self._limits = hello
                return
            assert last is not None
            raise errors.UnavailableError(
                f"no kvstore daemon reachable at {', '.join(self.config.endpoints)}: {last.message}",
                code="ERROR_CODE_UNSPECIFIED",
            ) from last

    async def close(self) -> None:
        self._closed = True
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
                        f"transport 'ucx' asked for, but {reason}", code="DATA_PLANE_UNAVAILABLE"
                    )
                return None
            context = _native.Context(self.config.ucx_tls or None)
            self._plane = (context, _native.Worker(context))
        return self._plane

    def _start_data_plane(self, hello) -> None:
        self.zero_copy = bool(self._plane and hello.data_plane)
        if self.config.transport == "ucx" and not self.zero_copy:
            raise errors.UnavailableError(
                "transport 'ucx' asked for, but the daemon has no zero-copy data plane", code="DATA_PLANE_UNAVAILABLE"
            )
        if self.zero_copy and self._staging is None:
            self._staging = StagingPool(self.register(anonymous_buffer(self.config.staging_bytes)))

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

    def _connection(self, endpoint: str) -> Connection:
        conn = self._connections.get(endpoint)
        if conn is None:
            conn = self._connections[endpoint] = Connection(endpoint)
        return conn

    @property
    def max_value_bytes(self) -> int:
        return self._limits.max_value_bytes if self._limits else 256 << 20

    @property
    def _max_batch_bytes(self) -> int:
        announced = self._limits.max_message_bytes - (1 << 20) if self._limits else self.config.max_batch_bytes
        return max(1, min(self.config.max_batch_bytes, announced))

    # -- the call path -----------------------------------------------------

    async def _call(self, service: str, method: str, request):
        """Send one RPC, retrying retryable failures across endpoints per the RetryPolicy."""
        if self._closed:
            raise errors.UnavailableError("the client is closed", code="SHUTTING_DOWN")
        await self.connect()
        policy = self.config.retry
        endpoints = self.config.endpoints
        last: errors.KVStoreError | None = None
        for attempt in range(1, policy.attempts + 1):
            delay = policy.delay(attempt)
            if delay:
                await asyncio.sleep(delay)
            index = (self._preferred + attempt - 1) % len(endpoints)
            conn = self._connection(endpoints[index])
            stub = getattr(conn, service)
            try:
                response = await getattr(stub, method)(request, timeout=self.config.timeout)
            except grpc.RpcError as exc:
                last = translate(exc, conn.endpoint)
                if not last.retryable or isinstance(last, errors.DeadlineExceededError) or last.code == TOO_BIG:
                    raise last from None
                log.debug("retrying %s.%s after %s", service, method, last)
                if last.code in ("UNKNOWN_CLIENT", "TRANSFER_FAILED") and self._plane is not None:
                    await self._rehello(conn)
                continue
            if index != self._preferred:
                self._preferred = index
            return response
        assert last is not None
        raise last

    async def _rehello(self, conn: Connection) -> None:
        """The daemon lost our data-plane session (it restarted, or a transfer failed)."""
        try:
            await conn.handshake(self.client_id, self.config.connect_timeout, self._plane[1].address)
        except errors.KVStoreError as exc:
            log.debug("re-introducing the client to %s failed: %s", conn.endpoint, exc)

    # -- writes ------------------------------------------------------------

    async def put(self, key: bytes, value, durability: str | None = None) -> None:
        """Store one block; returns once it reached ``durability`` ("memory", "disk", "sync")."""
        await self.put_many([(key, value)], durability=durability)

    async def put_many(self, items: Iterable[tuple[bytes, Any]] | Mapping[bytes, Any], durability: str | None = None) -> int:
        """Store many blocks; returns how many were stored."""
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
                    f"value {i} is {view.nbytes} bytes; the daemon's limit is {limit}", code="VALUE_TOO_LARGE", index=i
                )
            views.append(view)
        sizes = [v.nbytes for v in views]
        ranges = list(by_count_and_bytes(sizes, self.config.max_batch_keys, self._max_batch_bytes))
        if self.zero_copy:
            calls = (self._put_staged(keys, views, start, stop, level) for start, stop in ranges)
        else:
            calls = (self._put_inline(keys, views, start, stop, level) for start, stop in ranges)
        return sum(await self._bounded(calls))

    async def _put_inline(self, keys, views, start: int, stop: int, level: int) -> int:
        blocks = []
        for key, view in zip(keys[start:stop], views[start:stop]):
            data = view.tobytes() if not isinstance(view.obj, bytes) or view.nbytes != len(view.obj) else view.obj
            blocks.append(data_pb2.BlockWrite(key=key, value=data, length=len(data), checksum=checksum(data)))
        request = data_pb2.PutRequest(namespace=self.namespace, blocks=blocks, durability=level)
        return await self._send_put(request, start)

    async def _put_staged(self, keys, views, start: int, stop: int, level: int) -> int:
        """Copy values into the registered staging pool, then let the daemon RMA-read them."""
        sizes = [v.nbytes for v in views[start:stop]]
        total = sum(ExtentAllocator.rounded(n) for n in sizes)
        base = await self._staging.acquire(total)
        if base is None:  # larger than the whole pool
            return await self._put_inline(keys, views, start, stop, level)
        try:
            offsets = []
            cursor = base
            for n in sizes:
                offsets.append(cursor)
                cursor += ExtentAllocator.rounded(n)
            region = self._staging.region
            await _copy(lambda: [region.view(o, v.nbytes).__setitem__(slice(None), v) for o, v in zip(offsets, views[start:stop])], total)
            checksums = [region.checksum(o, n) for o, n in zip(offsets, sizes)]
            try:
                return await self._put_region(keys[start:stop], region, offsets, sizes, checksums, level, start)
            except errors.ResourceExhaustedError as exc:
                if exc.code != TOO_BIG:
                    raise
        finally:
            await self._staging.release(base, total)
        return await self._put_inline(keys, views, start, stop, level)

    async def _put_region(self, keys, region: MemoryRegion, offsets, sizes, checksums, level: int, start: int) -> int:
        request = data_pb2.PutRequest(
            namespace=self.namespace,
            durability=level,
            client_id=self.client_id,
            region=data_pb2.RemoteRegion(region_id=region.region_id, rkey=region.rkey),
            blocks=[
                data_pb2.BlockWrite(key=k, length=n, checksum=c, remote_address=region.address + o)
                for k, o, n, c in zip(keys, offsets, sizes, checksums)
            ],
        )
        return await self._send_put(request, start)

    async def _send_put(self, request, start: int) -> int:
        try:
            return (await self._call("data", "Put", request)).stored
        except errors.KVStoreError as exc:
            if exc.index >= 0:
                exc.index += start
            raise

    async def put_from(
        self,
        keys: Sequence[bytes],
        region: MemoryRegion,
        offsets: Sequence[int],
        sizes: Sequence[int],
        durability: str | None = None,
    ) -> int:
        """Store blocks that lie in a registered region; the daemon reads them by RMA.

        Returns how many were stored. With no zero-copy path to the daemon the
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
                    f"value {i} is {size} bytes; the daemon's limit is {limit}", code="VALUE_TOO_LARGE", index=i
                )
        ranges = list(by_count_and_bytes(list(sizes), self.config.max_batch_keys, self._max_batch_bytes))
        if not (self.zero_copy and region.zero_copy):
            views = [region.view(o, n) for o, n in zip(offsets, sizes)]
            return sum(await self._bounded(self._put_inline(keys, views, a, b, level) for a, b in ranges))
        checksums = [region.checksum(o, n) for o, n in zip(offsets, sizes)]

        async def send(a: int, b: int) -> int:
            try:
                return await self._put_region(keys[a:b], region, offsets[a:b], sizes[a:b], checksums[a:b], level, a)
            except errors.ResourceExhaustedError as exc:
                if exc.code != TOO_BIG:
                    raise
            views = [region.view(o, n) for o, n in zip(offsets, sizes)]
            return await self._put_inline(keys, views, a, b, level)

        return sum(await self._bounded(send(a, b) for a, b in ranges))

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Delete blocks; returns how many existed."""
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        calls = (
            self._call("data", "Delete", data_pb2.KeysRequest(namespace=self.namespace, keys=chunk))
            for _, chunk in by_count(keys, self.config.max_batch_keys)
        )
        return sum(r.deleted for r in await self._bounded(calls))

    # -- reads -------------------------------------------------------------

    async def get(self, key: bytes) -> bytes | None:
        """The block's bytes, or None when it is not stored."""
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Blocks in the order of ``keys``; None for each miss."""
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        await self.connect()
        if self.zero_copy:
            slot = ExtentAllocator.rounded(self._slot_hint)
            per_call = max(1, min(self.config.max_batch_keys, self._max_batch_bytes // slot))
            chunks = list(by_count(keys, per_call))
            parts = await self._bounded(self._get_staged(start, chunk, slot) for start, chunk in chunks)
        else:
            chunks = list(by_count(keys, self.config.max_batch_keys))
            parts = await self._bounded(self._get_chunk(start, chunk) for start, chunk in chunks)
        return [value for part in parts for value in part]

    async def _get_staged(self, start: int, keys, slot: int) -> list[bytes | None]:
        """Let the daemon RMA-write blocks into staging slots, then copy them out."""
        base = await self._staging.acquire(slot * len(keys))
        if base is None:
            return await self._get_chunk(start, keys)
        region = self._staging.region
        try:
            offsets = [base + j * slot for j in range(len(keys))]
            results = await self._get_region(keys, region, offsets, [slot] * len(keys), start)
            out: list[bytes | None] = []
            larger: list[int] = []
            for j, result in enumerate(results):
                if result is None:
                    out.append(None)
                elif result < 0:
                    out.append(None)
                    larger.append(j)
                else:
                    out.append(bytes(region.view(offsets[j], result)))
        finally:
            await self._staging.release(base, slot * len(keys))
        seen = [len(v) for v in out if v is not None]
        if seen or larger:
            self._slot_hint = max(seen, default=self._slot_hint)
        for j in larger:  # blocks larger than the slot guess: ask again, sized exactly
            out[j] = await self._get_one_exact(keys[j], start + j)
        return out

    async def _get_one_exact(self, key: bytes, position: int) -> bytes | None:
        size = self._slot_hint
        for _ in range(2):  # the block may be overwritten by a larger one in between
            base = await self._staging.acquire(size)
            if base is None:
                break
            try:
                (result,) = await self._get_region([key], self._staging.region, [base], [size], position)
                if result is not None and result >= 0:
                    return bytes(self._staging.region.view(base, result))
            finally:
                await self._staging.release(base, size)
            if result is None:
                return None
            size = -result
        return (await self._get_chunk(position, [key]))[0]

    async def _get_region(self, keys, region: MemoryRegion, offsets, capacities, start: int) -> list[int | None]:
        """One zero-copy Get: per key its length written, None on a miss, or
        ``-length`` when the block did not fit its slot. Checksums are verified over
        the region's bytes; a mismatch is asked for once more, then raised."""
        request = data_pb2.GetRequest(
            namespace=self.namespace,
            keys=keys,
            client_id=self.client_id,
            region=data_pb2.RemoteRegion(region_id=region.region_id, rkey=region.rkey),
            slots=[data_pb2.RemoteSlot(address=region.address + o, capacity=c) for o, c in zip(offsets, capacities)],
        )
        for attempt in (1, 2):
            try:
                response = await self._call("data", "Get", request)
            except errors.ResourceExhaustedError as exc:
                if exc.code != TOO_BIG:
                    raise
                return await self._get_inline_into(keys, region, offsets, capacities, start)
            if len(response.results) != len(keys):
                raise errors.InternalError(f"the daemon answered {len(response.results)} of {len(keys)} keys")
            out: list[int | None] = []
            corrupt = None
            for j, (result, offset) in enumerate(zip(response.results, offsets)):
                if not result.found:
                    out.append(None)
                elif result.too_small:
                    out.append(-result.length)
                else:
                    if self.config.verify_checksums and region.checksum(offset, result.length) != result.checksum:
                        corrupt = j
                    out.append(result.length)
            if corrupt is None:
                return out
            log.warning("block %d failed its checksum in transit; asking again", start + corrupt)
        raise errors.DataCorruptionError(f"block {start + corrupt} failed its checksum twice in transit", index=start + corrupt)

    async def _get_inline_into(self, keys, region: MemoryRegion, offsets, capacities, start: int) -> list[int | None]:
        """Blocks too large for the daemon to stage travel inline, then land in the region."""
        out: list[int | None] = []
        for value, offset, capacity in zip(await self._get_chunk(start, keys), offsets, capacities):
            if value is None:
                out.append(None)
            elif len(value) > capacity:
                out.append(-len(value))
            else:
                region.view(offset, len(value))[:] = value
                out.append(len(value))
        return out

    async def get_into(
        self, keys: Sequence[bytes], region: MemoryRegion, offsets: Sequence[int], capacities: Sequence[int]
    ) -> list[int | None]:
        """Fetch blocks straight into a registered region (the daemon writes them by RMA).

        Returns the bytes written per key, None for a miss. A block larger than its
        capacity raises InvalidArgumentError (code BUFFER_TOO_SMALL) naming its index.
        """
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        _same_length(keys, offsets, capacities, "offsets", "capacities")
        for i, (offset, capacity) in enumerate(zip(offsets, capacities)):
            region.check(offset, capacity, i)
        await self.connect()
        chunks = list(by_count(list(range(len(keys))), self.config.max_batch_keys))
        if self.zero_copy and region.zero_copy:
            parts = await self._bounded(
                self._get_region([keys[i] for i in idx], region, [offsets[i] for i in idx], [capacities[i] for i in idx], start)
                for start, idx in chunks
            )
            results = [r for part in parts for r in part]
        else:
            values = await self.get_many(keys)
            results = []
            for i, value in enumerate(values):
                if value is None:
                    results.append(None)
                elif len(value) > capacities[i]:
                    results.append(-len(value))
                else:
                    region.view(offsets[i], len(value))[:] = value
                    results.append(len(value))
        for i, result in enumerate(results):
            if result is not None and result < 0:
                raise errors.InvalidArgumentError(
                    f"block {i} is {-result} bytes but its slot holds {capacities[i]}", code="BUFFER_TOO_SMALL", index=i
                )
        return results

    async def _get_chunk(self, start: int, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        retried: set[int] = set()
        while len(out) < len(keys):
            request = data_pb2.GetRequest(namespace=self.namespace, keys=keys[len(out) :])
            response = await self._call("data", "Get", request)
            if not response.results:
                raise errors.InternalError("the daemon answered a Get with no results")
            for result in response.results:
                position = start + len(out)
                if not result.found:
                    out.append(None)
                    continue
                value = result.value
                if self.config.verify_checksums and (len(value) != result.length or checksum(value) != result.checksum):
                    if position in retried:
                        raise errors.DataCorruptionError(
                            f"block {position} failed its checksum twice in transit", index=position
                        )
                    retried.add(position)
                    log.warning("block %d failed its checksum in transit; asking again", position)
                    break  # re-ask from this key on
                out.append(value)
        return out

    async def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """For each key, whether a block is stored under it."""
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        calls = (
            self._call("data", "Exists", data_pb2.KeysRequest(namespace=self.namespace, keys=chunk))
            for _, chunk in by_count(keys, self.config.max_batch_keys)
        )
        return [bool(e) for r in await self._bounded(calls) for e in r.exists]

    async def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading keys, in order, are stored (the scheduler's prefix-cache hit)."""
        keys = [validate_key(k, i) for i, k in enumerate(keys)]
        total = 0
        for _, chunk in by_count(keys, self.config.max_batch_keys):
            request = data_pb2.KeysRequest(namespace=self.namespace, keys=chunk)
            count = (await self._call("data", "LookupPrefix", request)).count
            total += count
            if count < len(chunk):
                break
        return total

    async def list(self, prefix: bytes = b"", *, limit: int | None = None) -> list[tuple[bytes, int]]:
        """(key, length) of stored blocks whose key starts with ``prefix``, in key order."""
        if not isinstance(prefix, bytes):
            raise errors.InvalidArgumentError("prefix must be bytes")
        out: list[tuple[bytes, int]] = []
        after = b""
        while limit is None or len(out) < limit:
            page = 1000 if limit is None else min(1000, limit - len(out))
            request = data_pb2.ListRequest(namespace=self.namespace, prefix=prefix, start_after=after, limit=page)
            response = await self._call("data", "List", request)
            out.extend((e.key, e.length) for e in response.entries)
            if not response.truncated or not response.entries:
                break
            after = response.entries[-1].key
        return out

    async def stat(self) -> dict:
        """Blocks and bytes stored in this client's namespace."""
        response = await self._call("data", "Stat", data_pb2.StatRequest(namespace=self.namespace))
        return {
            "tenant": self.config.tenant,
            "subtenant": self.config.subtenant,
            "blocks": response.stats.blocks,
            "bytes": response.stats.bytes,
        }

    # -- admin -------------------------------------------------------------

    async def server_stats(self) -> dict:
        """Daemon-wide statistics: tiers, namespaces, uptime."""
        r = await self._call("admin", "ServerStats", admin_pb2.ServerStatsRequest())
        return {
            "node_id": r.node_id,
            "address": r.address,
            "data_dir": r.data_dir,
            "version": r.version,
            "uptime_seconds": r.uptime_seconds,
            "tiers": {t.name: {"blocks": t.blocks, "bytes": t.bytes, "capacity_bytes": t.capacity_bytes} for t in r.tiers},
            "namespaces": r.namespaces,
            "corrupt_blocks": r.corrupt_blocks,
            "evictions": r.evictions,
            "requests": r.requests,
            "data_plane": {"enabled": r.data_plane, "ucx_tls": r.ucx_tls, "clients": r.data_plane_clients},
            "arena_used_bytes": r.arena_used_bytes,
        }

    async def namespaces(self, tenant: str = "") -> list[dict]:
        r = await self._call("admin", "ListNamespaces", admin_pb2.ListNamespacesRequest(tenant=tenant))
        return [
            {"tenant": n.namespace.tenant, "subtenant": n.namespace.subtenant, "blocks": n.blocks, "bytes": n.bytes}
            for n in r.namespaces
        ]

    async def drop_namespace(self) -> dict:
        """Delete every block of this client's namespace at once."""
        r = await self._call("admin", "DropNamespace", admin_pb2.DropNamespaceRequest(namespace=self.namespace))
        return {"blocks": r.blocks, "bytes": r.bytes}

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


