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
from kvstore.client.transport import Connection, translate
from kvstore.namespace import validate_key

log = logging.getLogger("kvstore.client")

DURABILITY = {
    "memory": data_pb2.DURABILITY_MEMORY,
    "disk": data_pb2.DURABILITY_DISK,
    "sync": data_pb2.DURABILITY_SYNC,
}
_FRAMING = 4096  # protobuf overhead allowance per block when bounding a batch


def _durability(value) -> int:
    if isinstance(value, str) and value.lower() in DURABILITY:
        return DURABILITY[value.lower()]
    raise errors.InvalidArgumentError(
        f"durability {value!r} is unknown; use 'memory', 'disk' or 'sync'", code="UNKNOWN_DURABILITY"
    )


def _as_bytes(value, index: int) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        raise errors.InvalidArgumentError(f"value {index} is a str; values are bytes-like", index=index)
    try:
        view = memoryview(value)
    except TypeError:
        raise errors.InvalidArgumentError(
            f"value {index} has type {type(value).__name__}, which is not bytes-like", index=index
        ) from None
    return view.tobytes()


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
            last: errors.KVStoreError | None = None
            for i, endpoint in enumerate(self.config.endpoints):
                conn = self._connection(endpoint)
                try:
                    self._limits = await conn.handshake(self.client_id, self.config.connect_timeout)
                    self._preferred = i
                    return
                except errors.KVStoreError as exc:
                    last = exc
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
                if not last.retryable or isinstance(last, errors.DeadlineExceededError):
                    raise last from None
                log.debug("retrying %s.%s after %s", service, method, last)
                continue
            if index != self._preferred:
                self._preferred = index
            return response
        assert last is not None
        raise last

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
        blocks = []
        for i, pair in enumerate(pairs):
            try:
                key, value = pair
            except (TypeError, ValueError):
                raise errors.InvalidArgumentError(f"item {i} is not a (key, value) pair", index=i) from None
            key = validate_key(key, i)
            data = _as_bytes(value, i)
            if len(data) > limit:
                raise errors.InvalidArgumentError(
                    f"value {i} is {len(data)} bytes; the daemon's limit is {limit}", code="VALUE_TOO_LARGE", index=i
                )
            blocks.append(data_pb2.BlockWrite(key=key, value=data, length=len(data), checksum=checksum(data)))
        sizes = [len(b.value) + len(b.key) + _FRAMING for b in blocks]
        ranges = list(by_count_and_bytes(sizes, self.config.max_batch_keys, self._max_batch_bytes))

        async def send(start: int, stop: int) -> int:
            request = data_pb2.PutRequest(namespace=self.namespace, blocks=blocks[start:stop], durability=level)
            try:
                return (await self._call("data", "Put", request)).stored
            except errors.KVStoreError as exc:
                if exc.index >= 0:
                    exc.index += start
                raise

        return sum(await self._bounded(send(start, stop) for start, stop in ranges))

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
        chunks = list(by_count(keys, self.config.max_batch_keys))
        parts = await self._bounded(self._get_chunk(start, chunk) for start, chunk in chunks)
        return [value for part in parts for value in part]

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


