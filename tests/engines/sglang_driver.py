"""Runs inside an environment with SGLang 0.5.23 (tests/engines/test_sglang.py):
SGLang's own storage factory (``StorageBackendFactory.create_backend("dynamic", ...)``)
loads ``kvstore.client.connectors.sglang.KVStoreHiCacheStorage`` by module path,
as ``--hicache-storage-backend dynamic`` does, and drives it the way SGLang's
cache controller does: ``register_mem_pool_host(pool)``, then ``batch_exists``,
``batch_set_v1`` / ``batch_get_v1`` with host indices from ``pool.alloc``.

The host pools are SGLang's real ``MHATokenToKVPoolHost`` and
``MLATokenToKVPoolHost``, built on CPU from CPU "device" buffers (SGLang's own
``MHABufferInfo`` / ``MLABufferInfo``); only the GPU copy kernels, which this
test does not use, need a GPU.

    python sglang_driver.py ENDPOINT

Prints one JSON line per phase; after phase "live" it waits for a line on stdin
(the test kills the daemon meanwhile) and then runs phase "dead"."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo, MLABufferInfo
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig, HiCacheStorageExtraInfo
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.storage import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_storage_hash_str

endpoint = sys.argv[1]
CPU = torch.device("cpu")
DTYPE = torch.bfloat16


def mha_pool(layout: str, layers: int, heads: int, head_dim: int, page: int, tokens: int) -> MHATokenToKVPoolHost:
    k = tuple(torch.zeros(tokens, heads, head_dim, dtype=DTYPE) for _ in range(layers))
    v = tuple(torch.zeros(tokens, heads, head_dim, dtype=DTYPE) for _ in range(layers))
    buffers = KVBuffers(
        k=k, v=v, k_data_ptrs=torch.tensor([t.data_ptr() for t in k]), v_data_ptrs=torch.tensor([t.data_ptr() for t in v]),
        layout=KVBufferLayout.NHD,
    )
    info = MHABufferInfo(
        buffers=buffers, page_size=page, head_num=heads, head_dim=head_dim, v_head_dim=head_dim, dtype=DTYPE, device=CPU
    )
    return MHATokenToKVPoolHost(
        info, 2.0, 0, page, layout, pin_memory=False, device="cpu",
        device_capacity_tokens=tokens, start_layer=0, end_layer=layers,
    )


def mla_pool(layout: str, layers: int, lora: int, rope: int, page: int, tokens: int) -> MLATokenToKVPoolHost:
    rows = tuple(torch.zeros(tokens, 1, lora + rope, dtype=DTYPE) for _ in range(layers))
    info = MLABufferInfo(
        buffers=rows, data_ptrs=torch.tensor([t.data_ptr() for t in rows]), layer_indices=tuple(range(layers)),
        device_layer_num=layers, page_size=page, kv_lora_rank=lora, qk_rope_head_dim=rope, kv_cache_dim=lora + rope,
        dtype=DTYPE, device=CPU,
    )
    return MLATokenToKVPoolHost(
        info, 2.0, 0, page, layout, pin_memory=False, device="cpu",
        device_capacity_tokens=tokens, start_layer=0, end_layer=layers, target_layer_num=layers,
    )


def backend(pool, model: str, mla: bool, interface_v1: int = 1, metrics: bool = False, **settings):
    """The backend as SGLang's cache controller builds and attaches it."""
    extra = {
        "backend_name": "kvstore", "module_path": "kvstore.client.connectors.sglang",
        "class_name": "KVStoreHiCacheStorage", "interface_v1": interface_v1,
        "endpoints": endpoint, "tenant": "sglang-test", "subtenant": "hicache",
        "attempt_timeout": 2.0, "timeout": 4.0, **settings,
    }
    config = HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=mla,
        enable_storage_metrics=metrics, is_page_first_layout=pool.layout == "page_first", model_name=model,
        extra_config=extra,
    )
    storage = StorageBackendFactory.create_backend("dynamic", config, pool)
    storage.register_mem_pool_host(pool)
    return storage


def fill(pool, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    flat = pool.kv_buffer.view(-1)
    flat.copy_(torch.randn(flat.numel(), generator=generator).to(DTYPE))


def pages(pool, indices: torch.Tensor) -> list[torch.Tensor]:
    """Each page's bytes, read through SGLang's own page accessor."""
    return [pool.get_data_page(int(indices[i]), flat=True).clone() for i in range(0, len(indices), pool.page_size)]


def exact(pool, expected: list[torch.Tensor], indices: torch.Tensor) -> list[bool]:
    return [torch.equal(a.view(torch.uint16), b.view(torch.uint16)) for a, b in zip(expected, pages(pool, indices))]


def hashes(n: int, page: int, seed: int, **key) -> list[str]:
    tokens = [(seed * 7919 + i) % 32000 for i in range(n * page)]
    return get_storage_hash_str(RadixKey(tokens, **key) if key else tokens, None, page_size=page)


def p50_ms(fn, rounds: int) -> tuple[float, float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def phase_layout(name: str, pool, mla: bool, n: int = 8) -> dict:
    page = pool.page_size
    storage = backend(pool, "org/model-a", mla, metrics=True)
    storage.register_mem_pool_host(pool)  # attached again: the pool's memory is registered once, not twice
    keys = hashes(n, page, seed=1)
    src = pool.alloc(n * page)
    fill(pool, seed=len(name))
    expected = pages(pool, src)
    info = HiCacheStorageExtraInfo(prefix_keys=[])
    before = storage.batch_exists(keys, info)
    stored = storage.batch_set_v1(keys, src, info)
    dst = pool.alloc(n * page)  # other host pages: what a prefetch fills
    got = storage.batch_get_v1(keys, dst, info)
    result = {
        "phase": name, "type": type(storage).__name__, "page_bytes": sum(storage.part_bytes),
        "blocks_per_page": len(storage.parts), "regions": len(storage.regions), "before": before, "stored": stored, "got": got,
        "exact": exact(pool, expected, dst),
        "exists_all": storage.batch_exists(keys, info),
        "exists_gap": storage.batch_exists(keys[:3] + ["0" * 64] + keys[3:], info),
        "exists_one": storage.exists(keys[0]), "exists_missing": storage.exists("f" * 64),
        "missing_get": storage.batch_get_v1(["e" * 64], pool.alloc(page)),
        "zero_copy": storage.client.zero_copy and all(r.zero_copy for r in storage.regions),
        "stats": dict(storage.stats), "failures": storage.failures.count,
        "metrics": len(storage.get_stats().prefetch_pgs),
    }
    # Another model, or another extra key (LoRA / cache_salt), never sees these pages.
    other_model = backend(pool, "org/model-b", mla)
    result["other_model_exists"] = other_model.batch_exists(keys)
    fill(pool, seed=99)
    other_model.batch_set_v1(keys, src)
    again = pool.alloc(n * page)
    result["after_other_model"] = exact(pool, expected, again) if all(storage.batch_get_v1(keys, again)) else []
    salted = hashes(n, page, seed=1, extra_key="lora-7")
    result["salted_differs"] = not set(salted) & set(keys)
    result["salted_exists"] = storage.batch_exists(salted)
    # The flat-page interface (interface_v1 off): SGLang's get_data_page copies.
    flat = backend(pool, "org/model-a", mla, interface_v1=0)
    fill(pool, seed=5)
    flat_src = expected_flat = pages(pool, src)
    result["flat_set"] = flat.batch_set(keys, flat_src)
    targets = [pool.get_dummy_flat_data_page() for _ in keys]
    result["flat_exact"] = [
        t is not None and torch.equal(t.view(torch.uint16), e.view(torch.uint16))
        for t, e in zip(flat.batch_get(keys, targets), expected_flat)
    ]
    result["flat_exists"] = flat.batch_exists(keys)
    result["flat_failures"] = flat.failures.count
    for s in (other_model, flat):
        s.close()
    for indices in (src, dst, again):
        pool.free(indices)
    return result, storage


def phase_costs(pool, mla: bool, n: int, durability: str, lookups: int = 64, rounds: int = 10, **settings) -> dict:
    """What SGLang's hot path costs: batch_exists of ``lookups`` pages, batch_set/get_v1 of ``n`` pages."""
    page = pool.page_size
    storage = backend(pool, f"org/model-cost-{durability}", mla, skip_existing=False, durability=durability, **settings)
    fill(pool, seed=3)
    indices = pool.alloc(n * page)
    keys = hashes(max(lookups, n), page, seed=11)
    for start in range(0, len(keys), n):
        storage.batch_set_v1(keys[start : start + n], indices)
    lookup = p50_ms(lambda: storage.batch_exists(keys[:lookups]), 200) if lookups else (None, None)
    sets = [hashes(n, page, seed=100 + r) for r in range(rounds)]
    set_ms = p50_ms(lambda: storage.batch_set_v1(sets.pop(), indices), rounds)
    get_keys = keys[:n]
    get_ms = p50_ms(lambda: storage.batch_get_v1(get_keys, indices), rounds)
    page_bytes = sum(storage.part_bytes)
    out = {
        "layout": pool.layout, "mla": mla, "durability": durability, "grpc": settings.get("local_channel") is False,
        "page_bytes": page_bytes, "pages_per_call": n,
        "lookup_pages": lookups, "lookup_hits": storage.batch_exists(keys[:lookups]),
        "lookup_p50_ms": lookup[0], "lookup_p99_ms": lookup[1],
        "set_per_page_us": set_ms[0] * 1e3 / n, "get_per_page_us": get_ms[0] * 1e3 / n,
        "set_gbps": n * page_bytes / (set_ms[0] / 1e3) / 1e9, "get_gbps": n * page_bytes / (get_ms[0] / 1e3) / 1e9,
        "failures": storage.failures.count, "zero_copy_pages": storage.stats["zero_copy_pages"],
        "inline_pages": storage.stats["inline_pages"],
    }
    storage.close()
    pool.free(indices)
    return out


def phase_dead(storage, pool) -> dict:
    page = pool.page_size
    keys = hashes(8, page, seed=1)
    started = time.perf_counter()
    out = {"phase": "dead"}
    try:
        out["exists"] = storage.batch_exists(keys)
        indices = pool.alloc(8 * page)
        out["got"] = storage.batch_get_v1(keys, indices)
        out["stored"] = storage.batch_set_v1(hashes(8, page, seed=2), indices)
        out["exists_one"] = storage.exists(keys[0])
        out["flat_got"] = [t is not None for t in storage.batch_get(keys[:1], [pool.get_dummy_flat_data_page()])]
        out["raised"] = None
    except Exception as exc:  # what SGLang would have seen
        out["raised"] = repr(exc)
    out["seconds"] = time.perf_counter() - started
    out["failures"] = storage.failures.count
    out["by_kind"] = dict(storage.failures.by_kind)
    return out


P = 16
results = []
survivor = None
mha = mha_pool("page_first", layers=4, heads=8, head_dim=64, page=P, tokens=1024)  # 128 KiB pages: K 64 KiB + V 64 KiB
for name, pool, mla in [
    ("mha-page_first", mha, False),
    ("mha-layer_first", mha_pool("layer_first", 2, 4, 32, P, 256), False),
    ("mla-page_first", mla_pool("page_first", 4, 512, 64, P, 512), True),  # 73.7 KiB pages, DeepSeek's row width
    ("mla-layer_first", mla_pool("layer_first", 2, 64, 16, P, 256), True),
]:
    result, storage = phase_layout(name, pool, mla)
    print(json.dumps(result), flush=True)
    if name == "mha-page_first":
        survivor = storage
    else:
        storage.close()
llama8b = mha_pool("page_first", 32, 8, 128, 64, 512)  # Llama-3-8B at TP 1: 8 MiB pages of 64 tokens
costs = [
    phase_costs(mha, False, 32, "disk"),
    phase_costs(mha, False, 32, "memory"),
    phase_costs(mha, False, 32, "memory", local_channel=False),  # the path of a client on another host
    phase_costs(llama8b, False, 8, "disk", lookups=0, rounds=5),
    phase_costs(llama8b, False, 8, "memory", lookups=0, rounds=5),
    phase_costs(mla_pool("page_first", 4, 512, 64, P, 1024), True, 32, "memory"),
]
print(json.dumps({"phase": "costs", "rows": costs}), flush=True)
sys.stdin.readline()  # the test kills the daemon now
print(json.dumps(phase_dead(survivor, mha)), flush=True)
survivor.close()
