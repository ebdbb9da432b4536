"""vLLM (0.32, 0.33) stores and reloads its KV cache in kvstore, by configuration alone.

Two routes, one module:

- ``KVStoreConnector``, a ``KVConnectorBase_V1``::

      kv_transfer_config = {
          "kv_connector": "KVStoreConnector",
          "kv_connector_module_path": "kvstore.client.connectors.vllm",
          "kv_role": "kv_both",
          "kv_connector_extra_config": {"endpoints": "10.0.0.5:7600", "tenant": "acme",
                                        "subtenant": "llama-70b", "token": "kvs_..."},
      }

  The scheduler asks one ``lookup_prefix`` per new request (one RPC per owner
  node) and loads a hit before the request runs (an asynchronous load: the
  request waits, its blocks are filled and verified, then it is scheduled with
  them counted as computed). Every layer's KV is saved from the attention layer
  as it is written (``save_kv_layer``), straight from vLLM's KV tensors, which
  are registered once with the SDK (``put_from``/``get_into``, no copies).

- ``KVStoreTier``, a secondary tier of vLLM's ``TieringOffloadingSpec`` (the
  offloading connector's CPU tier backed by kvstore), for GPUs::

      "kv_connector": "OffloadingConnector",
      "kv_connector_extra_config": {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": ...,
          "secondary_tiers": [{"type": "KVStoreTier", "module_path": "kvstore.client.connectors.vllm",
                               "endpoints": "10.0.0.5:7600", "tenant": "acme", "subtenant": "llama-70b"}]}

Settings not given there come from the ``KVSTORE_*`` variables.

Keys. A chunk is one vLLM block of tokens; its hash chains over the prompt's
tokens (xxh3-128 of the previous hash and the block's token ids), starting from
a seed of the request's ``cache_salt``, LoRA and multimodal inputs. Keys carry a
digest of the model, its dtype and KV dtype, block size, layer and head counts
and the parallel layout, and the worker's rank, so two models, salts, layouts
or ranks never share KV. Every block has a small manifest, written after all
its parts were stored: the lengths and xxh3 checksums of its parts and a digest
of the worker's physical KV layout. A lookup asks for manifests only; a load
checks every part against its manifest before vLLM may use it. A missing,
unreadable or corrupt block (bytes that are not what the connector stored, even
when rewritten through the store with a valid checksum of the store's own) is a
miss: the request recomputes from that block, and nothing wrong reaches attention.

Failures never reach the engine: a daemon that is down or slow gives misses
(the scheduler stops asking for a few seconds after a failed lookup), a save
that fails is dropped; each kind is logged at ERROR once (then once a minute)
and counted. Counters and timings are in ``connector.stats`` and, with the
``stats_file`` setting, in ``<stats_file>.<role><rank>.json``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import xxhash
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.kv_offload.base import LookupResult, Medium, OffloadKey, ReqContext, RequestOffloadingContext
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob

from kvstore import errors
from kvstore.client.api import Client
from kvstore.client.connectors import SETTINGS, client_settings
from kvstore.client.connectors.failures import Failures
from kvstore.client.connectors.loop import LoopThread

log = logging.getLogger("kvstore.client.connectors.vllm")

# Settings of kv_connector_extra_config beyond the SDK's (connectors.SETTINGS).
LOOKUP_TIMEOUT = 2.0  # seconds the scheduler waits for one prefix lookup
LOAD_TIMEOUT = 30.0  # seconds one request's load may take before it is a miss
PAUSE_AFTER_FAILURE = 5.0  # seconds the scheduler skips lookups after one failed

# A block's manifest: magic, version, part count, layout digest, chain hash; then (length, xxh3) per part.
_MAGIC = b"KVSM"
_VERSION = 1
_HEADER = struct.Struct("<4sBxH8s16s")
_PART = struct.Struct("<QQ")


# -- keys, chains and manifests ---------------------------------------------------------


def namespace_digest(*facts: Any) -> str:
    """16 hex digits naming everything two engines must share to share KV."""
    return xxhash.xxh3_64_hexdigest(repr(facts).encode())


def engine_facts(vllm_config) -> tuple:
    """What a block's bytes depend on, known to the scheduler and the workers alike."""
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    parallel = vllm_config.parallel_config

    def fact(fn, *args):
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - a model that lacks one of them still gets a stable digest
            return None

    return (
        model.model,
        getattr(model, "revision", None),
        str(model.dtype),
        str(cache.cache_dtype),
        cache.block_size,
        fact(model.get_num_layers, parallel),
        fact(model.get_num_kv_heads, parallel),
        fact(model.get_head_size),
        parallel.tensor_parallel_size,
        parallel.pipeline_parallel_size,
    )


def request_seed(request) -> bytes:
    """The chain's start for ``request``: its cache_salt, LoRA adapter and multimodal inputs."""
    lora = getattr(request, "lora_request", None)
    media = [
        getattr(feature, "identifier", None) or getattr(feature, "mm_hash", None)
        for feature in getattr(request, "mm_features", None) or ()
    ]
    facts = (getattr(request, "cache_salt", None), getattr(lora, "lora_name", None), media)
    return xxhash.xxh3_128_digest(repr(facts).encode())


def chain_hashes(token_ids, block_size: int, seed: bytes, count: int) -> list[bytes]:
    """The hashes of the first ``count`` full blocks of ``token_ids``, each over all blocks before it."""
    hashes, previous = [], seed
    for i in range(count):
        block = token_ids[i * block_size : (i + 1) * block_size]
        previous = xxhash.xxh3_128_digest(previous + struct.pack(f"<{len(block)}i", *block))
        hashes.append(previous)
    return hashes


def manifest_key(namespace: str, chain: bytes, rank: int) -> bytes:
    return b"vllm/%s/%s/r%d/m" % (namespace.encode(), chain.hex().encode(), rank)


def part_key(namespace: str, chain: bytes, rank: int, layer: int, run: int) -> bytes:
    return b"vllm/%s/%s/r%d/%d.%d" % (namespace.encode(), chain.hex().encode(), rank, layer, run)


def encode_manifest(layout: bytes, chain: bytes, parts: list[tuple[int, int]]) -> bytes:
    return _HEADER.pack(_MAGIC, _VERSION, len(parts), layout, chain) + b"".join(_PART.pack(n, c) for n, c in parts)


def decode_manifest(value: bytes, layout: bytes, chain: bytes, count: int) -> list[tuple[int, int]] | None:
    """The (length, checksum) of each part, or None when ``value`` is not this block's manifest."""
    if len(value) != _HEADER.size + count * _PART.size:
        return None
    magic, version, n, their_layout, their_chain = _HEADER.unpack_from(value)
    if (magic, version, n, their_layout, their_chain) != (_MAGIC, _VERSION, count, layout, chain):
        return None
    return [_PART.unpack_from(value, _HEADER.size + i * _PART.size) for i in range(count)]


def block_runs(block) -> list[tuple[int, int]]:
    """(byte offset, byte length) of the contiguous runs that hold one block of a
    KV tensor (``block`` is ``layer[0]``), whatever its strides."""
    elem = block.element_size()
    dims = sorted(((block.stride(d), block.size(d)) for d in range(block.dim()) if block.size(d) > 1), reverse=True)
    packed, i = 1, len(dims) - 1
    while i >= 0 and dims[i][0] == packed:
        packed *= dims[i][1]
        i -= 1
    offsets = [0]
    for stride, size in dims[: i + 1]:
        offsets = [o + k * stride * elem for o in offsets for k in range(size)]
    return sorted((o, packed * elem) for o in offsets)


class Stats:
    """Counters and timings of one connector, optionally mirrored to a JSON file."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.values: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def add(self, **amounts: float) -> None:
        with self._lock:
            self.values.update(amounts)

    def peak(self, name: str, value: float) -> None:
        with self._lock:
            self.values[name] = max(self.values[name], value)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.values)

    def write(self, failures: Failures) -> None:
        if not self.path:
            return
        data = {**self.snapshot(), "failures": dict(failures.by_kind)}
        temporary = f"{self.path}.tmp{os.getpid()}"
        with open(temporary, "w") as out:
            json.dump(data, out)
        os.replace(temporary, self.path)


# -- the KV connector --------------------------------------------------------------------


class KVStoreConnectorMetadata(KVConnectorMetadata):
    """One step's work for the workers: loads per request, and blocks to save."""

    def __init__(self) -> None:
        self.loads: dict[str, list[tuple[int, bytes]]] = {}  # request id -> [(block id, chain hash)]
        self.saves: list[tuple[int, bytes]] = []  # [(block id, chain hash)]


@dataclass
class _Request:
    """What the scheduler side keeps of one request."""

    hashes: list[bytes]  # chain hashes of its full prompt blocks
    stored: int = 0  # leading blocks the store holds
    saved: int = 0  # leading blocks stored or handed to the workers to save
    local: int = 0  # leading blocks in vLLM's own prefix cache
    block_ids: list[int] = field(default_factory=list)
    asked: int | None = None  # num_computed_tokens of the last lookup


@dataclass
class _Layer:
    region: Any  # the MemoryRegion that holds the layer's tensor
    offset: int  # byte offset of block 0 in the region
    stride: int  # bytes from one block to the next
    runs: list[tuple[int, int]]  # (offset, length) of the block's parts


class KVStoreConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        self.is_scheduler = role == KVConnectorRole.SCHEDULER
        self.block_size = vllm_config.cache_config.block_size
        parallel = vllm_config.parallel_config
        self.world = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        self.namespace = namespace_digest(*engine_facts(vllm_config))
        self.lookup_timeout = float(extra.get("lookup_timeout", LOOKUP_TIMEOUT))
        self.load_timeout = float(extra.get("load_timeout", LOAD_TIMEOUT))
        self.rank = 0 if self.is_scheduler else _worker_rank(parallel)
        who = f"kvstore vLLM connector ({'scheduler' if self.is_scheduler else f'worker {self.rank}'})"
        self.failures = Failures(log, who)
        stats_file = extra.get("stats_file")
        self.stats = Stats(f"{stats_file}.{'scheduler' if self.is_scheduler else 'worker'}{self.rank}.json" if stats_file else None)
        settings = client_settings(extra)
        self.durability = settings.pop("durability", None)
        self.enabled = True
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) > 1:
            self.enabled = False
            log.error("%s: %d KV cache groups (a hybrid model); only one is supported, kvstore stays off", who, len(groups))
        self._loop = LoopThread("kvstore-vllm")
        try:
            self.client = self._loop.run(_make_client(settings), 10.0)
        except errors.KVStoreError as exc:
            log.error("%s: bad settings (%s): every lookup will miss", who, exc)
            self._loop.close()
            raise
        if self.is_scheduler:
            self._requests: dict[str, _Request] = {}
            self._loads: dict[str, list[tuple[int, bytes]]] = {}
            self._paused_until = 0.0
            self._recompute_on_load_failure(vllm_config.kv_transfer_config, extra)
        else:
            self._layers: dict[str, _Layer] = {}
            self._layer_index: dict[str, int] = {}
            self._layout = b"\0" * 8
            self._regions: dict[int, Any] = {}
            self._saving: dict[str, Any] = {}  # layer name -> future of its puts this step
            self._done = collections.deque()  # (request id, invalid block ids) of finished loads
            self._loading: set[str] = set()
            self._invalid: set[int] = set()
        log.info(
            "%s: %s, namespace %s/%s, keys vllm/%s", who, ",".join(self.client.config.endpoints),
            self.client.config.tenant, self.client.config.subtenant, self.namespace,
        )

    @staticmethod
    def _recompute_on_load_failure(kv_transfer_config, extra: dict) -> None:
        """A block that fails to load is recomputed (vLLM's default fails the request),
        unless kv_connector_extra_config says ``"load_failure_policy": "fail"``."""
        wanted = extra.get("load_failure_policy", "recompute")
        if getattr(kv_transfer_config, "kv_load_failure_policy", wanted) != wanted:
            try:
                kv_transfer_config.kv_load_failure_policy = wanted
            except Exception as exc:  # noqa: BLE001 - a frozen config keeps vLLM's own policy
                log.warning("kvstore vLLM connector: cannot set kv_load_failure_policy=%s: %s", wanted, exc)

    # -- scheduler side ------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        state = self._requests.get(request.request_id)
        if state is None:
            tokens = request.prompt_token_ids
            if not self.enabled or tokens is None:
                return 0, False
            full = len(tokens) // self.block_size
            state = self._requests[request.request_id] = _Request(chain_hashes(tokens, self.block_size, request_seed(request), full))
        if state.asked != num_computed_tokens:
            state.asked = num_computed_tokens
            state.local = num_computed_tokens // self.block_size
            state.stored = self._lookup(state.hashes[: (request.num_prompt_tokens - 1) // self.block_size])
            state.saved = state.stored
        hit = (state.stored - state.local) * self.block_size
        return (hit, True) if hit > 0 else (0, False)

    def _lookup(self, hashes: list[bytes]) -> int:
        """How many leading blocks every rank has stored (one batched lookup)."""
        if not hashes or time.monotonic() < self._paused_until:
            return 0
        keys = [manifest_key(self.namespace, h, r) for h in hashes for r in range(self.world)]
        started = time.perf_counter()
        try:
            hits = self._loop.run(self.client.lookup_prefix(keys, deadline=self.lookup_timeout), self.lookup_timeout + 1)
        except errors.KVStoreError as exc:
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE
            self.failures("lookup", exc)
            return 0
        seconds = time.perf_counter() - started
        self.stats.add(lookups=1, lookup_keys=len(keys), lookup_seconds=seconds, hit_blocks=hits // self.world)
        self.stats.peak("lookup_seconds_max", seconds)
        return hits // self.world

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None:
            return
        state.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens > 0:
            first, count = state.local, num_external_tokens // self.block_size
            self._loads[request.request_id] = [(state.block_ids[i], state.hashes[i]) for i in range(first, first + count)]

    def build_connector_meta(self, scheduler_output) -> KVStoreConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        meta.loads, self._loads = self._loads, {}
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                self._plan_saves(meta, state, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids.extend(new_ids[0])
            self._plan_saves(meta, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        if meta.loads or meta.saves:
            self.stats.add(loads_planned=len(meta.loads), saves_planned=len(meta.saves))
            self.stats.write(self.failures)
        return meta

    def _plan_saves(self, meta: KVStoreConnectorMetadata, state: _Request, computed: int) -> None:
        """Blocks of the prompt whose KV is complete after this step and not stored yet."""
        full = min(computed // self.block_size, len(state.hashes), len(state.block_ids))
        for i in range(state.saved, full):
            meta.saves.append((state.block_ids[i], state.hashes[i]))
        state.saved = max(state.saved, full)

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        self._requests.pop(request.request_id, None)
        self._loads.pop(request.request_id, None)
        return False, None

    # -- worker side ----------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict) -> None:
        described = []
        for index, (name, tensor) in enumerate(kv_caches.items()):
            if tensor.device.type != "cpu":
                self.enabled = False
                log.error("kvstore vLLM connector: KV tensors on %s; this connector moves host memory only "
                          "(on GPUs use KVStoreTier under the OffloadingConnector); kvstore stays off", tensor.device)
                return
            storage = tensor.untyped_storage()
            base = storage.data_ptr()
            region = self._regions.get(base)
            if region is None:
                region = self._regions[base] = self._loop.run(_register(self.client, base, storage.nbytes()), 30.0)
            runs = block_runs(tensor[0])
            self._layers[name] = _Layer(region, tensor.data_ptr() - base, tensor.stride(0) * tensor.element_size(), runs)
            self._layer_index[name] = index
            described.append((name, str(tensor.dtype), tuple(tensor.shape[1:]), tuple(tensor.stride()), runs))
        self._layout = xxhash.xxh3_64_digest(repr(described).encode())
        log.info("kvstore vLLM connector (worker %d): %d layers registered in %d region(s), %d part(s) per block",
                 self.rank, len(self._layers), len(self._regions), sum(len(x.runs) for x in self._layers.values()))

    def _parts(self, block_id: int, chain: bytes):
        """(layer name, key, region, offset, length) of each part of one block."""
        for name, layer in self._layers.items():
            index = self._layer_index[name]
            start = layer.offset + block_id * layer.stride
            for r, (offset, length) in enumerate(layer.runs):
                yield name, part_key(self.namespace, chain, self.rank, index, r), layer.region, start + offset, length

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._get_connector_metadata()
        for req_id, blocks in meta.loads.items():
            self._loading.add(req_id)
            future = _submit(self._loop, self._load(req_id, blocks))
            future.add_done_callback(lambda f, req_id=req_id, blocks=blocks: self._loaded(f, req_id, blocks))

    def _loaded(self, future, req_id: str, blocks) -> None:
        try:
            invalid = future.result()
        except BaseException as exc:  # noqa: BLE001 - whatever happened, the blocks are not to be used
            self.failures("load", exc)
            invalid = {block_id for block_id, _ in blocks}
        self._done.append((req_id, invalid))

    async def _load(self, req_id: str, blocks: list[tuple[int, bytes]]) -> set[int]:
        """Fill ``blocks`` from the store and verify them; returns the block ids not to use."""
        started = time.perf_counter()
        if not self.enabled:
            return {block_id for block_id, _ in blocks}
        deadline = self.load_timeout
        values = await self.client.get_many([manifest_key(self.namespace, c, self.rank) for _, c in blocks], deadline=deadline)
        count = sum(len(layer.runs) for layer in self._layers.values())
        manifests, missing, corrupt = [], 0, 0
        for value, (_, chain) in zip(values, blocks):
            parts = None if value is None else decode_manifest(value, self._layout, chain, count)
            if parts is None:
                missing, corrupt = (1, 0) if value is None else (0, 1)
                break
            manifests.append(parts)
        # One get_into per region, all of them at once.
        calls: dict[int, list] = {}
        for i, (block_id, chain) in enumerate(blocks[: len(manifests)]):
            for j, (_, key, region, offset, length) in enumerate(self._parts(block_id, chain)):
                calls.setdefault(id(region), []).append((region, key, offset, length, i, j))
        results = await asyncio.gather(*(
            self.client.get_into([e[1] for e in entries], entries[0][0], [e[2] for e in entries], [e[3] for e in entries],
                                 deadline=deadline)
            for entries in calls.values()
        ))
        good = len(manifests)
        for entries, got in zip(calls.values(), results):
            for (region, _, offset, length, i, j), n in zip(entries, got):
                if i >= good:
                    continue
                want_length, want_sum = manifests[i][j]
                if n is None or n != length or want_length != length:
                    good, missing, corrupt = i, 1, 0
                elif region.checksum(offset, length) != want_sum:
                    good, missing, corrupt = i, 0, 1
        loaded = good * self.block_size
        self.stats.add(
            load_requests=1, loaded_blocks=good, loaded_tokens=loaded, missing_blocks=missing, corrupt_blocks=corrupt,
            load_seconds=time.perf_counter() - started, load_bytes=good * sum(n for n, _ in manifests[0]) if good else 0,
        )
        if corrupt:
            self.failures("verify", errors.DataCorruptionError(f"block {good} of request {req_id} does not match its checksum"))
        return {block_id for block_id, _ in blocks[good:]}

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads finish, verified, before vLLM schedules the request (see get_finished).
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        meta = self._get_connector_metadata()
        if not meta.saves or not self.enabled or layer_name not in self._layers:
            return
        parts = [p for block_id, chain in meta.saves for p in self._parts(block_id, chain) if p[0] == layer_name]
        self._saving[layer_name] = _submit(self._loop, self._save_layer(parts))

    async def _save_layer(self, parts) -> list[int]:
        region = parts[0][2]
        sums = [region.checksum(offset, length) for _, _, _, offset, length in parts]
        await self.client.put_from(
            [p[1] for p in parts], region, [p[3] for p in parts], [p[4] for p in parts], self.durability
        )
        return sums

    def wait_for_save(self) -> None:
        if not self._saving:
            return
        started = time.perf_counter()
        meta = self._get_connector_metadata()
        saving, self._saving = self._saving, {}
        sums: dict[str, list[int]] = {}
        try:
            for name, future in saving.items():
                sums[name] = future.result(self.load_timeout)
        except Exception as exc:  # noqa: BLE001 - a lost save is a future miss, never an engine error
            self.failures("save", exc)
            return
        if set(sums) != set(self._layers):
            self.failures("save", errors.InternalError(f"{len(self._layers) - len(sums)} layer(s) were not saved this step"))
            return
        manifests, position = [], dict.fromkeys(sums, 0)
        for block_id, chain in meta.saves:
            entries = []
            for name, _, _, _, length in self._parts(block_id, chain):
                entries.append((length, sums[name][position[name]]))
                position[name] += 1
            manifests.append((manifest_key(self.namespace, chain, self.rank), encode_manifest(self._layout, chain, entries)))
        try:
            self._loop.run(self.client.put_many(manifests, self.durability), self.load_timeout)
        except errors.KVStoreError as exc:
            self.failures("save", exc)
            return
        per_block = sum(n for layer in self._layers.values() for _, n in layer.runs)
        self.stats.add(saved_blocks=len(meta.saves), save_steps=1, save_bytes=per_block * len(meta.saves),
                       save_wait_seconds=time.perf_counter() - started)
        self.stats.write(self.failures)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = set()
        while self._done:
            req_id, invalid = self._done.popleft()
            self._loading.discard(req_id)
            done.add(req_id)
            self._invalid |= invalid
        if done:
            self.stats.write(self.failures)
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        invalid, self._invalid = self._invalid, set()
        return invalid

    def shutdown(self) -> None:
        self.stats.write(self.failures)
        self._loop.close(self.client.close())


def _worker_rank(parallel) -> int:
    """This worker's rank among the tp x pp workers of one engine."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        return get_pp_group().rank_in_group * parallel.tensor_parallel_size + get_tp_group().rank_in_group
    except Exception:  # noqa: BLE001 - no parallel groups (a single worker)
        return 0


def _submit(loop: LoopThread, coro) -> concurrent.futures.Future:
    """Start ``coro`` on the connector's loop without waiting for it."""
    return asyncio.run_coroutine_threadsafe(coro, loop.loop)


async def _make_client(settings: dict) -> Client:
    client = Client(**settings)
    await client.connect()
    return client


async def _register(client: Client, address: int, length: int):
    return client.register_ptr(address, length)


# -- the secondary tier of TieringOffloadingSpec ------------------------------------------


class _TierLookups(AsyncLookupManager):
    """Existence probes of a step, batched into one ``exists`` per request on a background thread."""

    def __init__(self, tier: "KVStoreTier", tier_type: str) -> None:
        super().__init__(tier_type=tier_type)
        self._tier = tier

    def batch_lookup(self, keys, req_context):
        tier = self._tier
        try:
            return tier._loop.run(
                tier.client.exists([tier._manifest(k) for k in keys], deadline=LOOKUP_TIMEOUT), LOOKUP_TIMEOUT + 1
            )
        except errors.KVStoreError as exc:
            tier.failures("lookup", exc)
            return [False] * len(keys)


class KVStoreTier(SecondaryTierManager):
    """kvstore as a secondary tier under vLLM's CPU offloading tier.

    Runs in the scheduler process: every call returns at once; transfers run on
    the connector's own event loop straight between the primary tier's CPU buffer
    (registered once) and the daemons, and complete through ``get_finished_jobs``.
    Each chunk is stored with a manifest holding its xxh3 checksum, written after
    the chunk; a lookup probes manifests, a load verifies the bytes it wrote into
    the primary buffer and reports the chunks that do not match as failed.
    """

    medium = Medium.STORAGE

    def __init__(
        self,
        offloading_spec,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector=None,
        locality: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        from vllm.v1.kv_offload.base import Locality

        self.locality = Locality(locality) if locality is not None else None
        self.failures = Failures(log, f"kvstore vLLM tier {tier_type}")
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"KVStoreTier: unknown settings {sorted(unknown)}")
        sdk = client_settings(settings)
        self.durability = sdk.pop("durability", None)
        self.namespace = namespace_digest(*_tier_facts(offloading_spec), self.block_size_bytes)
        self._loop = LoopThread("kvstore-vllm-tier")
        try:
            self.client = self._loop.run(_make_client(sdk), 10.0)
        except errors.KVStoreError as exc:
            log.error("kvstore vLLM tier: bad settings (%s)", exc)
            self._loop.close()
            raise
        self._view = primary_kv_view
        self.region = self._loop.run(_register_view(self.client, primary_kv_view), 30.0)
        self._results: collections.deque[JobResult] = collections.deque()
        self._jobs: dict[int, Any] = {}
        self._promotions: dict[int, list] = {}  # job id -> keys of a load not yet reported
        self._lookups = _TierLookups(self, tier_type)
        log.info("kvstore vLLM tier: %s, namespace %s/%s, %d chunks of %d bytes", ",".join(self.client.config.endpoints),
                 self.client.config.tenant, self.client.config.subtenant, len(primary_kv_view), self.block_size_bytes)

    def _key(self, key: OffloadKey) -> bytes:
        return b"vllm-tier/%s/%s" % (self.namespace.encode(), bytes(key).hex().encode())

    def _manifest(self, key: OffloadKey) -> bytes:
        return self._key(key) + b"/m"

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        found = self._lookups.lookup(key, req_context)
        if found is None:
            return LookupResult.RETRY
        return LookupResult.HIT if found else LookupResult.MISS

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._lookups.cleanup(req_context.req_id)

    def on_schedule_end(self, context) -> None:
        self._lookups.flush()

    def submit_store(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, self._store(list(job_metadata.keys), list(job_metadata.chunk_ids)))

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._promotions[job_metadata.job_id] = list(job_metadata.keys)
        self._submit(job_metadata, self._load(list(job_metadata.keys), list(job_metadata.chunk_ids)))

    def _submit(self, job: TransferJob, coro) -> None:
        future = self._jobs[job.job_id] = _submit(self._loop, coro)
        future.add_done_callback(lambda f, job=job: self._finished(job, f))

    def _finished(self, job: TransferJob, future) -> None:
        try:
            ok_keys, seconds, nbytes = future.result()
        except BaseException as exc:  # noqa: BLE001 - a failed job is reported, never raised
            self.failures("store" if not job.is_promotion else "load", exc)
            ok_keys, seconds, nbytes = [], None, None
        keys = list(job.keys)
        success = len(ok_keys) == len(keys)
        self._results.append(JobResult(
            job_id=job.job_id, success=success,
            successful_keys=None if success or not job.is_promotion else ok_keys,
            transfer_time=seconds, transfer_bytes=nbytes,
        ))
        self._jobs.pop(job.job_id, None)

    def _offsets(self, chunk_ids) -> list[int]:
        return [int(c) * self.block_size_bytes for c in chunk_ids]

    async def _store(self, keys, chunk_ids):
        started = time.perf_counter()
        size, offsets = self.block_size_bytes, self._offsets(chunk_ids)
        sums = [self.region.checksum(o, size) for o in offsets]
        await self.client.put_from([self._key(k) for k in keys], self.region, offsets, [size] * len(keys), self.durability)
        await self.client.put_many(
            [(self._manifest(k), _TIER_SUM.pack(size, s)) for k, s in zip(keys, sums)], self.durability
        )
        return keys, time.perf_counter() - started, size * len(keys)

    async def _load(self, keys, chunk_ids):
        started = time.perf_counter()
        size, offsets = self.block_size_bytes, self._offsets(chunk_ids)
        manifests = await self.client.get_many([self._manifest(k) for k in keys])
        got = await self.client.get_into([self._key(k) for k in keys], self.region, offsets, [size] * len(keys))
        ok = []
        for key, offset, manifest, n in zip(keys, offsets, manifests, got):
            if manifest is None or n is None or len(manifest) != _TIER_SUM.size:
                continue
            length, want = _TIER_SUM.unpack(manifest)
            if length == n == size and self.region.checksum(offset, size) == want:
                ok.append(key)
            else:
                self.failures("verify", errors.DataCorruptionError(f"chunk {bytes(key).hex()} does not match its checksum"))
        return ok, time.perf_counter() - started, size * len(ok)

    def get_finished_jobs(self):
        results = []
        while self._results:
            result = self._results.popleft()
            keys = self._promotions.pop(result.job_id, None)
            if keys is not None and not result.success:
                # The scheduler stops asking for chunks that failed to load (they are recomputed).
                kept = set(result.successful_keys or ())
                self._lookups.mark_miss([k for k in keys if k not in kept])
            results.append(result)
        return results

    def has_pending_work(self) -> bool:
        return bool(self._jobs)

    def drain_jobs(self) -> None:
        for future in list(self._jobs.values()):
            try:
                future.result(LOAD_TIMEOUT)
            except Exception:  # noqa: BLE001 - reported through get_finished_jobs
                pass
        deadline = time.monotonic() + 1.0
        while self._jobs and time.monotonic() < deadline:  # done callbacks run on the loop thread
            time.sleep(0.001)

    def shutdown(self) -> None:
        self.drain_jobs()
        self._lookups.shutdown()
        self.region.close()
        self._loop.close(self.client.close())


_TIER_SUM = struct.Struct("<QQ")  # a chunk's manifest: length, xxh3


def _tier_facts(offloading_spec) -> tuple:
    """What a chunk's bytes depend on, from the offloading spec's own config."""
    config = getattr(offloading_spec, "config", None)
    model = getattr(config, "model", None)
    parallel = getattr(config, "parallel", None)
    cache = getattr(config, "cache", None)
    groups = [(getattr(g, "tokens_per_block", None), tuple(getattr(g, "layer_names", ()))) for g in getattr(config, "groups", ())]
    return (
        getattr(model, "name", None), str(getattr(model, "dtype", None)), getattr(cache, "tokens_per_hash", None),
        getattr(parallel, "tp_size", None), getattr(parallel, "pp_size", None), getattr(parallel, "pcp_size", None),
        getattr(parallel, "dcp_size", None), tuple(groups), getattr(offloading_spec, "blocks_per_chunk", None),
    )


async def _register_view(client: Client, view: memoryview):
    return client.register(view)


__all__ = ["KVStoreConnector", "KVStoreConnectorMetadata", "KVStoreTier"]
