"""LMCache's remote-storage plugin: LMCache 0.5.6 stores and loads its KV chunks in kvstore.

Turned on by configuration alone::

    remote_storage_plugins: [kvstore]
    extra_config:
      remote_storage_plugin.kvstore.module_path: kvstore.client.connectors.lmcache
      remote_storage_plugin.kvstore.class_name: KVStoreConnector
      remote_storage_plugin.kvstore.endpoints: 10.0.0.5:7600,10.0.0.6:7600
      remote_storage_plugin.kvstore.tenant: acme
      remote_storage_plugin.kvstore.subtenant: llama-70b
      remote_storage_plugin.kvstore.durability: memory
      remote_storage_plugin.kvstore.token: kvs_...

Settings not given there come from the ``KVSTORE_*`` variables (``KVSTORE_ENDPOINTS``
...). LMCache builds the connector as ``cls(loop=, local_cpu_backend=, config=)``
and runs every coroutine on ``loop`` (its storage thread); the one synchronous
call, ``batched_contains``, comes from the engine's thread and waits for the loop.

A chunk's key is ``CacheEngineKey.to_string()``: model, world size, worker id,
chunk hash, dtype and the request's ``lmcache.tag.*`` tags, so chunks of two
models, ranks or tags never meet; tenant and subtenant keep deployments apart.
With ``save_chunk_meta`` (LMCache's default) the stored value is LMCache's own
``RemoteMetadata`` header then the payload, so LMCache's other backends could read
it; without it, the payload alone, and then LMCache's CPU pool is registered
once with the SDK and chunks move zero-copy: puts are ``put_from`` the chunk's
place in the pool, gets ``get_into`` a chunk allocated there (``zero_copy_puts``,
``zero_copy_gets`` count them; a chunk outside the pool is copied). A prefix
lookup is one ``lookup_prefix`` (one RPC per owner node). LMCache swallows every exception of a plugin into a miss, so
this one logs the first failure of each kind at ERROR (then at most once a
minute) and counts them in ``failures``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.protocol import RemoteMetadata
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from kvstore import errors
from kvstore.client.api import Client
from kvstore.client.connectors import SETTINGS, client_settings
from kvstore.client.connectors.failures import Failures

log = logging.getLogger("kvstore.client.connectors.lmcache")

PLUGIN = "kvstore"
# LMCache waits on batched_contains and exists_sync with no deadline of its own.
SYNC_TIMEOUT = 10.0


def plugin_settings(extra_config: dict | None, name: str = PLUGIN) -> dict[str, Any]:
    """The ``remote_storage_plugin.<name>.*`` settings of LMCache's extra_config."""
    prefix = f"remote_storage_plugin.{name}."
    return client_settings({k[len(prefix):]: v for k, v in (extra_config or {}).items() if k.startswith(prefix)}, SETTINGS)


class KVStoreConnector(RemoteConnector):
    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend, config) -> None:
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        settings = plugin_settings(getattr(config, "extra_config", None))
        self.durability = settings.pop("durability", None)
        try:
            self.client = Client(**settings)
        except errors.KVStoreError as exc:
            log.error("kvstore LMCache plugin: bad settings (%s): every lookup will miss", exc)
            raise
        self._failures = Failures(log, "kvstore LMCache plugin")
        self.zero_copy_puts = 0
        self.zero_copy_gets = 0
        # With the header, a value is header + payload and cannot be moved from the pool as it lies.
        self.pool = None if self.save_chunk_meta else self._register_pool()
        log.info(
            "kvstore LMCache plugin: %s, namespace %s/%s, chunk metadata %s, %s",
            ",".join(self.client.config.endpoints), self.client.config.tenant, self.client.config.subtenant,
            "stored" if self.save_chunk_meta else "not stored",
            f"CPU pool of {self.pool.length} bytes registered" if self.pool else "chunks copied",
        )

    def _register_pool(self):
        """LMCache's pinned CPU pool registered with the SDK (None: no pool found, copy)."""
        allocator = getattr(self.local_cpu_backend, "memory_allocator", None)
        for name in ("buffer", "cpu_buffer"):  # MixedMemoryAllocator, PagedCpuGpuMemoryAllocator
            pool = getattr(allocator, name, None)
            if pool is not None and getattr(pool, "device", None) is not None and pool.device.type == "cpu" and pool.numel():
                return self.client.register_ptr(pool.data_ptr(), pool.numel() * pool.element_size())
        return None

    def _in_pool(self, obj: MemoryObj) -> int | None:
        """The chunk's offset in the registered pool, None when it lies elsewhere."""
        if self.pool is None:
            return None
        offset = obj.data_ptr - self.pool.address
        return offset if 0 <= offset and offset + obj.get_size() <= self.pool.length else None

    # -- keys, values and failures ---------------------------------------------

    @staticmethod
    def _key(key) -> bytes:
        return key.to_string().encode()

    @property
    def failures(self) -> int:
        """Failures LMCache saw as misses, of every kind (``failures_by_kind`` splits them)."""
        return self._failures.count

    @property
    def failures_by_kind(self) -> dict[str, int]:
        return dict(self._failures.by_kind)

    def _failed(self, what: str, exc: BaseException) -> None:
        self._failures(what, exc, "LMCache sees a miss")

    def _encode(self, obj: MemoryObj):
        payload = obj.byte_array.cast("B")[: obj.get_size()]
        if not self.save_chunk_meta:
            return payload
        header = RemoteMetadata(len(payload), obj.get_shapes(), obj.get_dtypes(), obj.get_memory_format())
        return header.serialize() + payload

    def _decode(self, value: bytes) -> MemoryObj | None:
        """A MemoryObj from LMCache's allocator holding ``value`` (None: no room now)."""
        view = memoryview(value)
        if self.save_chunk_meta:
            meta = RemoteMetadata.deserialize(view[: self.remote_metadata_bytes])
            payload = view[self.remote_metadata_bytes :]
            if meta.length != len(payload):
                raise errors.DataCorruptionError(f"chunk header says {meta.length} bytes, {len(payload)} stored")
            obj = self.local_cpu_backend.allocate(meta.shapes, meta.dtypes, meta.fmt, busy_loop=False)
        else:
            payload = view
            obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt, busy_loop=False)
        if obj is None:
            return None
        try:
            obj.byte_array.cast("B")[: len(payload)] = payload
            if not self.save_chunk_meta and len(payload) < self.full_chunk_size_bytes:
                obj = self.reshape_partial_chunk(obj, len(payload))
        except BaseException:
            obj.ref_count_down()
            raise
        return obj

    # -- RemoteConnector ------------------------------------------------------------

    async def exists(self, key) -> bool:
        try:
            return (await self.client.exists([self._key(key)]))[0]
        except errors.KVStoreError as exc:
            self._failed("exists", exc)
            return False

    def exists_sync(self, key) -> bool:
        return asyncio.run_coroutine_threadsafe(self.exists(key), self.loop).result(SYNC_TIMEOUT)

    async def get(self, key) -> MemoryObj | None:
        return (await self.batched_get([key]))[0]

    async def put(self, key, memory_obj: MemoryObj) -> None:
        await self.batched_put([key], [memory_obj])

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys) -> list[MemoryObj | None]:
        try:
            if self.pool is not None:
                return await self._get_into_pool(keys)
            values = await self.client.get_many([self._key(k) for k in keys])
        except errors.KVStoreError as exc:
            self._failed("get", exc)
            return [None] * len(keys)
        return [None if v is None else self._decode(v) for v in values]

    async def _get_into_pool(self, keys) -> list[MemoryObj | None]:
        """Full-chunk slots from LMCache's allocator, filled by the daemon in place."""
        objs = [self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt, busy_loop=False) for _ in keys]
        results: list[MemoryObj | None] = [None] * len(keys)
        try:
            placed = [(i, o, self._in_pool(o)) for i, o in enumerate(objs) if o is not None]
            pooled = [(i, o, offset) for i, o, offset in placed if offset is not None]
            if pooled:
                sizes = await self.client.get_into(
                    [self._key(keys[i]) for i, _, _ in pooled], self.pool,
                    [offset for _, _, offset in pooled], [o.get_size() for _, o, _ in pooled],
                )
                for (i, obj, _), size in zip(pooled, sizes):
                    if size is None:
                        continue
                    try:
                        results[i] = obj if size == self.full_chunk_size_bytes else self.reshape_partial_chunk(obj, size)
                    except ValueError as exc:  # not a whole number of tokens: not a chunk of this model
                        self._failed("get", errors.DataCorruptionError(f"stored chunk of {size} bytes: {exc}"))
                        continue
                    self.zero_copy_gets += 1
            for i, obj, offset in placed:
                if offset is None:  # outside the pool (LMCache fell back to another allocator): copy
                    value = await self.client.get(self._key(keys[i]))
                    results[i] = None if value is None else self._decode(value)
        finally:
            for obj, result in zip(objs, results):
                if obj is not None and result is None:
                    obj.ref_count_down()
        return results

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys, memory_objs) -> None:
        # LMCache holds a reference on each chunk for the put and drops it when this returns.
        try:
            pooled, copied = [], []
            for key, obj in zip(keys, memory_objs):
                offset = self._in_pool(obj)
                (copied if offset is None else pooled).append((self._key(key), obj, offset))
            if pooled:
                await self.client.put_from(
                    [k for k, _, _ in pooled], self.pool, [offset for _, _, offset in pooled],
                    [o.get_size() for _, o, _ in pooled], durability=self.durability,
                )
                self.zero_copy_puts += len(pooled)
            if copied:
                await self.client.put_many([(k, self._encode(o)) for k, o, _ in copied], durability=self.durability)
        except errors.KVStoreError as exc:
            self._failed("put", exc)

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys) -> int:
        """How many leading keys are stored (called from the engine's thread)."""
        future = asyncio.run_coroutine_threadsafe(self.batched_async_contains("", keys), self.loop)
        try:
            return future.result(SYNC_TIMEOUT)
        except TimeoutError as exc:
            future.cancel()
            self._failed("lookup", exc)
            return 0

    async def batched_async_contains(self, lookup_id: str, keys, pin: bool = False) -> int:
        try:
            return await self.client.lookup_prefix([self._key(k) for k in keys])
        except errors.KVStoreError as exc:
            self._failed("lookup", exc)
            return 0

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        try:
            await self.client.stat()
        except errors.KVStoreError as exc:
            self._failed("ping", exc)
            return 1
        return 0

    async def list(self) -> list[str]:
        return [key.decode(errors="replace") for key, _ in await self.client.list()]

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        await self.client.close()
