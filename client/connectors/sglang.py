"""SGLang's HiCache storage backend: SGLang 0.5.23 keeps its host-memory KV
pages in kvstore (the L3 tier of hierarchical caching).

Turned on by configuration alone::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
            "module_path": "kvstore.client.connectors.sglang",
            "class_name": "KVStoreHiCacheStorage", "interface_v1": 1,
            "endpoints": "10.0.0.5:7600,10.0.0.6:7600", "tenant": "acme",
            "subtenant": "llama-70b", "durability": "memory", "token": "kvs_..."}'

Settings not given there come from the ``KVSTORE_*`` variables. SGLang builds
the backend as ``cls(storage_config, {})`` and hands it its host pool with
``register_mem_pool_host(pool)``: the pool's ``kv_buffer`` (one host tensor) is
registered once, and ``interface_v1: 1`` makes SGLang call ``batch_get_v1`` /
``batch_set_v1`` with host indices, which move each page straight between that
buffer and the daemons (``get_into`` / ``put_from`` at the offsets that
``pool.get_page_buffer_meta`` names). Without ``interface_v1`` SGLang copies
each page into a flat tensor and calls ``batch_get`` / ``batch_set``; that works
too, one copy slower.

A page is one or more blocks, as the pool lays it out: an MHA page is its K
and its V (``<hash>/k``, ``<hash>/v``; per layer in the ``layer_first`` layout),
an MLA page one block (``<hash>/kv``). Keys are
``sglang/<model>/<shard>/<layout>.<dtype>.p<page size>/<page hash>/<part>``:
SGLang's page hash already chains the request's extra key (LoRA) and
cache_salt; model and shard (TP rank of an MHA model; none for MLA, whose
ranks hold the same pages; PP, CP, DCP ranks) keep models and ranks apart,
the layout part keeps pages of another layout or dtype from being read as
this one's, and tenant and subtenant keep deployments apart.

``batch_exists`` (the prefetch hit query) is one ``lookup_prefix``: one RPC per
owner node. SGLang calls every method from its own threads and turns any
exception into a failed request, so each call runs on the connector's event
loop with a deadline and every failure is a miss (False, 0, None), counted
in ``failures`` and logged at ERROR (first of each kind, then at most once a
minute). Bad settings raise at creation: SGLang then refuses to start.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from kvstore import durability as durabilities
from kvstore import errors
from kvstore.client.api import Client
from kvstore.client.connectors import SETTINGS, client_settings
from kvstore.client.connectors.failures import Failures
from kvstore.client.connectors.loop import LoopThread

log = logging.getLogger("kvstore.client.connectors.sglang")

WHO = "kvstore SGLang backend"
# Settings of the extra config handed to the SDK's Client (the rest falls back to KVSTORE_*).
CLIENT_SETTINGS = tuple(s for s in SETTINGS if s != "durability") + (
    "local_channel", "ucx_tls", "tls", "tls_cert", "tls_key", "tls_server_name",
)
# Beyond the SDK's own deadline, how long an engine thread waits for the loop.
SYNC_MARGIN = 5.0
KEY_ROOT = "sglang"


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def backend_settings(extra_config: dict | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SDK settings, connector settings) of SGLang's storage extra config."""
    extra = extra_config or {}
    client = client_settings(extra, CLIENT_SETTINGS)
    own = {
        "durability": extra.get("durability") or None,
        "skip_existing": _flag(extra.get("skip_existing", True)),
        "interface_v1": _flag(extra.get("interface_v1", 0)),
    }
    return client, own


def shard_of(config: HiCacheStorageConfig) -> str:
    """The part of a key that says which rank's share of a page it is."""
    parts = ["mla"] if config.is_mla_model else [f"tp{config.tp_rank}of{config.tp_size}"]
    if config.pp_size > 1:
        parts.append(f"pp{config.pp_rank}of{config.pp_size}")
    if config.attn_cp_size > 1:
        parts.append(f"cp{config.attn_cp_rank}of{config.attn_cp_size}")
    if config.dcp_size > 1:
        parts.append(f"dcp{config.dcp_rank}of{config.dcp_size}")
    return "-".join(parts)


def part_names(count: int, is_mla: bool) -> tuple[str, ...]:
    """Names of the blocks of one page, in ``get_page_buffer_meta`` order."""
    if is_mla:
        return ("kv",) if count == 1 else tuple(f"kv{i}" for i in range(count))
    if count == 2:
        return ("k", "v")
    if count % 2 == 0:  # layer_first: K then V of each layer
        return tuple(f"{kind}{layer}" for layer in range(count // 2) for kind in ("k", "v"))
    return tuple(f"part{i}" for i in range(count))


def _pool_ranges(pool) -> list[tuple[int, int]]:
    """The host memory of ``pool`` as disjoint [start, end) address ranges."""
    tensors = []
    kv_buffer = getattr(pool, "kv_buffer", None)
    tensors.extend(kv_buffer if isinstance(kv_buffer, (list, tuple)) else [kv_buffer])
    hybrid = getattr(pool, "get_hybrid_pool_buffer", None)
    if hybrid is not None:
        try:
            tensors.extend(hybrid())
        except Exception:  # a pool without separate buffers
            pass
    ranges = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for t in tensors
        if isinstance(t, torch.Tensor) and t.numel() > 0
    )
    merged: list[list[int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


class _Plan:
    """Where each block of a batch of pages lies: region, offset, size."""

    __slots__ = ("keys", "groups", "sizes")

    def __init__(self, keys: list[bytes], groups: dict[int, tuple[list[int], list[int], list[int]]], sizes: list[int]):
        self.keys = keys  # block keys, page-major
        self.groups = groups  # region index -> (block positions, offsets, sizes)
        self.sizes = sizes


class KVStoreHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None) -> None:
        self.storage_config = storage_config
        client_settings, own = backend_settings(getattr(storage_config, "extra_config", None))
        self.durability = own["durability"]
        self.skip_existing = own["skip_existing"]
        self.zero_copy_interface = own["interface_v1"]
        self.failures = Failures(log, WHO)
        self.stats: Counter[str] = Counter()
        self._loop = LoopThread("kvstore-sglang")
        try:
            if self.durability is not None:
                durabilities.parse(self.durability)
            self.client = self._loop.run(self._make_client(client_settings), 30.0)
        except errors.KVStoreError as exc:
            log.error("%s: bad settings (%s): SGLang cannot use kvstore", WHO, exc)
            self._loop.close()
            raise
        self.sync_timeout = self.client.config.timeout + SYNC_MARGIN
        self.mem_pool_host = None
        self.prefix = b""
        self.parts: tuple[bytes, ...] = ()
        self.part_bytes: tuple[int, ...] = ()
        self.regions: list = []
        self._starts: list[int] = []
        self._ends: list[int] = []
        # SGLang's storage metrics (get_stats), when it asks for them.
        self._metrics = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [], "backup_bandwidth": []}
        self._page_gb = 0.0
        log.info(
            "%s: %s, namespace %s/%s, model %s, %s", WHO, ",".join(self.client.config.endpoints),
            self.client.config.tenant, self.client.config.subtenant, storage_config.model_name,
            "zero-copy pages (interface_v1)" if self.zero_copy_interface else "flat pages",
        )

    @staticmethod
    async def _make_client(settings: dict) -> Client:
        return Client(**settings)

    def _run(self, coro):
        return self._loop.run(coro, self.sync_timeout)

    # -- the host pool ------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        try:
            self._attach(mem_pool_host)
        except Exception as exc:
            self.parts = ()
            self.failures("register", exc, "kvstore stays off: every lookup misses")

    def _attach(self, pool) -> None:
        if getattr(pool, "kv_buffer", None) is None:
            raise errors.InvalidArgumentError(f"{type(pool).__name__} has no kv_buffer (a logical pool: not supported)")
        config = self.storage_config
        page_size = getattr(pool, "logical_page_size", None) or pool.page_size
        ptrs, sizes = pool.get_page_buffer_meta(torch.arange(page_size, dtype=torch.int64))
        self._release_regions()  # attached again: the new pool's memory replaces the old
        for start, end in _pool_ranges(pool):
            region = self._loop.call(self.client.register_ptr, start, end - start)
            self.regions.append(region)
            self._starts.append(start)
            self._ends.append(end)
        dtype = str(pool.dtype).removeprefix("torch.")
        model = config.model_name or "model"
        self.prefix = f"{KEY_ROOT}/{model}/{shard_of(config)}/{pool.layout}.{dtype}.p{page_size}/".encode()
        self.parts = tuple(name.encode() for name in part_names(len(ptrs), config.is_mla_model))
        self.part_bytes = tuple(int(s) for s in sizes)
        self._page_gb = sum(self.part_bytes) / (1 << 30)
        for i, (ptr, size) in enumerate(zip(ptrs, sizes)):
            self._locate(int(ptr), int(size), i)
        log.info(
            "%s: host pool %s (%s, page %d tokens, %d bytes in %d block(s)) registered as %d region(s) of %d bytes",
            WHO, type(pool).__name__, pool.layout, page_size, sum(self.part_bytes), len(self.parts),
            len(self.regions), sum(r.length for r in self.regions),
        )

    def _release_regions(self) -> None:
        regions, self.regions, self._starts, self._ends = self.regions, [], [], []
        if regions:
            self._loop.call(lambda: [r.close() for r in regions])

    def _locate(self, ptr: int, size: int, index: int) -> tuple[int, int]:
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0 or ptr + size > self._ends[i]:
            raise errors.InvalidArgumentError(f"block {index} at {ptr:#x} (+{size}) is outside the registered host pool")
        return i, ptr - self._starts[i]

    # -- keys ---------------------------------------------------------------------

    def block_keys(self, keys: List[str]) -> list[bytes]:
        """The keys of every block of ``keys``' pages, page-major."""
        prefix = self.prefix
        return [prefix + k.encode() + b"/" + part for k in keys for part in self.parts]

    def flat_key(self, key: str) -> bytes:
        """A page stored whole (the flat copy of SGLang's non-zero-copy interface)."""
        return self.prefix + key.encode() + b"/page"

    def _page_keys(self, keys: List[str]) -> tuple[list[bytes], int]:
        if self.zero_copy_interface:
            return self.block_keys(keys), len(self.parts)
        return [self.flat_key(k) for k in keys], 1

    def _plan(self, keys: List[str], host_indices: torch.Tensor) -> _Plan:
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        if len(ptrs) != len(keys) * len(self.parts):
            raise errors.InvalidArgumentError(
                f"{len(keys)} pages of {len(self.parts)} blocks, but the pool names {len(ptrs)} buffers"
            )
        groups: dict[int, tuple[list[int], list[int], list[int]]] = {}
        for position, (ptr, size) in enumerate(zip(ptrs, sizes)):
            region, offset = self._locate(int(ptr), int(size), position)
            group = groups.setdefault(region, ([], [], []))
            group[0].append(position)
            group[1].append(offset)
            group[2].append(int(size))
        return _Plan(self.block_keys(keys), groups, [int(s) for s in sizes])

    def _moved(self, pages: int, plan: _Plan) -> None:
        direct = self.client.zero_copy and all(self.regions[r].zero_copy for r in plan.groups)
        self.stats["zero_copy_pages" if direct else "inline_pages"] += pages

    # -- interface_v1: pages straight between the host pool and the daemons ---------

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """How many leading pages are stored: one lookup_prefix over their blocks."""
        if not keys or not self.parts:
            return 0
        block_keys, per_page = self._page_keys(keys)
        try:
            found = self._run(self.client.lookup_prefix(block_keys))
        except Exception as exc:
            self.failures("lookup", exc)
            return 0
        self.stats["lookups"] += 1
        self.stats["lookup_pages"] += len(keys)
        self.stats["lookup_hits"] += found // per_page
        return found // per_page

    def batch_get_v1(
        self, keys: List[str], host_indices: torch.Tensor, extra_info: Optional[HiCacheStorageExtraInfo] = None
    ) -> List[bool]:
        if not keys:
            return []
        if not self.parts:
            return [False] * len(keys)
        started = time.perf_counter()
        try:
            plan = self._plan(keys, host_indices)
            lengths = self._run(self._get_into(plan))
        except Exception as exc:
            self.failures("get", exc)
            return [False] * len(keys)
        n = len(self.parts)
        done = [
            all(lengths[i * n + j] == plan.sizes[i * n + j] for j in range(n))
            for i in range(len(keys))
        ]
        hits = sum(done)
        self.stats["get_pages"] += hits
        self.stats["get_misses"] += len(keys) - hits
        self._moved(hits, plan)
        self._metric("prefetch", hits, started)
        return done

    async def _get_into(self, plan: _Plan) -> list[Optional[int]]:
        lengths: list[Optional[int]] = [None] * len(plan.keys)

        async def one(region: int, positions: list[int], offsets: list[int], sizes: list[int]) -> None:
            got = await self.client.get_into([plan.keys[p] for p in positions], self.regions[region], offsets, sizes)
            for p, length in zip(positions, got):
                lengths[p] = length

        await asyncio.gather(*(one(r, *g) for r, g in plan.groups.items()))
        return lengths

    def batch_set_v1(
        self, keys: List[str], host_indices: torch.Tensor, extra_info: Optional[HiCacheStorageExtraInfo] = None
    ) -> List[bool]:
        if not keys:
            return []
        if not self.parts:
            return [False] * len(keys)
        started = time.perf_counter()
        try:
            plan = self._plan(keys, host_indices)
            written = self._run(self._put_from(plan))
        except Exception as exc:
            self.failures("put", exc, "the pages are not stored")
            return [False] * len(keys)
        self.stats["set_pages"] += len(keys)
        self.stats["set_blocks_written"] += written
        self._moved(len(keys), plan)
        self._metric("backup", len(keys), started)
        return [True] * len(keys)

    async def _put_from(self, plan: _Plan) -> int:
        """Write the blocks not stored yet (all of them without skip_existing); how many were written."""
        wanted = set(range(len(plan.keys)))
        if self.skip_existing:
            present = await self.client.exists(plan.keys)
            wanted = {p for p, here in enumerate(present) if not here}
        if not wanted:
            return 0

        async def one(region: int, positions: list[int], offsets: list[int], sizes: list[int]) -> int:
            chosen = [i for i, p in enumerate(positions) if p in wanted]
            if not chosen:
                return 0
            keys = [plan.keys[positions[i]] for i in chosen]
            stored = await self.client.put_from(
                keys, self.regions[region], [offsets[i] for i in chosen], [sizes[i] for i in chosen],
                durability=self.durability,
            )
            if stored != len(keys):
                raise errors.UnavailableError(f"{stored} of {len(keys)} blocks stored")
            return stored

        return sum(await asyncio.gather(*(one(r, *g) for r, g in plan.groups.items())))

    # -- the flat-page interface (without interface_v1) -------------------------------

    def exists(self, key: str) -> bool:
        if not self.parts:
            return False
        block_keys, _ = self._page_keys([key])
        try:
            return all(self._run(self.client.exists(block_keys)))
        except Exception as exc:
            self.failures("lookup", exc)
            return False

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        return self.batch_get([key], [target_location], [target_sizes])[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None):
        """Pages into SGLang's flat page tensors (``target_locations``); None for each miss."""
        if not keys:
            return []
        if not self.parts or target_locations is None:
            return [None] * len(keys)
        try:
            values = self._run(self.client.get_many([self.flat_key(k) for k in keys]))
        except Exception as exc:
            self.failures("get", exc)
            return [None] * len(keys)
        out = []
        for value, target in zip(values, target_locations):
            flat = None if target is None else target.reshape(-1).view(torch.uint8)
            if value is None or flat is None or len(value) != flat.numel():
                out.append(None)
                continue
            memoryview(flat.numpy())[:] = value
            out.append(target)
        self.stats["get_pages"] += sum(v is not None for v in out)
        self.stats["get_misses"] += sum(v is None for v in out)
        return out

    def set(
        self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None
    ) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> bool:
        """Flat page tensors (SGLang's ``get_data_page``) stored whole; True when all were."""
        if not keys or not self.parts or values is None:
            return False
        try:
            items = [
                (self.flat_key(k), v.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                for k, v in zip(keys, values)
            ]
            stored = self._run(self.client.put_many(items, durability=self.durability))
        except Exception as exc:
            self.failures("put", exc, "the pages are not stored")
            return False
        self.stats["set_pages"] += stored
        return stored == len(keys)

    # -- the rest of HiCacheStorage -------------------------------------------------

    def clear(self) -> bool:
        """Delete this rank's pages (those under its key prefix)."""
        if not self.prefix:
            return False
        try:
            listed = self._run(self.client.list(self.prefix))
            keys = [k for k, _ in listed]
            for start in range(0, len(keys), 1024):
                self._run(self.client.delete(keys[start : start + 1024]))
        except Exception as exc:
            self.failures("clear", exc, "pages stay stored")
            return False
        log.info("%s: cleared %d blocks under %s", WHO, len(keys), self.prefix.decode(errors="replace"))
        return True

    def _metric(self, kind: str, pages: int, started: float) -> None:
        if not getattr(self.storage_config, "enable_storage_metrics", False) or not pages:
            return
        elapsed = max(time.perf_counter() - started, 1e-9)
        self._metrics[f"{kind}_pgs"].append(pages)
        self._metrics[f"{kind}_bandwidth"].append(pages * self._page_gb / elapsed)

    def get_stats(self):
        """SGLang's StorageMetrics since the last call (with --enable-cache-report metrics), else None."""
        if not getattr(self.storage_config, "enable_storage_metrics", False):
            return None
        from sglang.srt.observability.metrics_collector import StorageMetrics

        metrics = StorageMetrics()
        for name, values in self._metrics.items():
            getattr(metrics, name).extend(values)
            values.clear()
        return metrics

    def close(self) -> None:
        regions, self.regions, self.parts = self.regions, [], ()

        async def close() -> None:
            for region in regions:
                region.close()
            await self.client.close()

        self._loop.close(close())
