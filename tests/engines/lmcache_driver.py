"""Runs inside an environment with LMCache 0.5.6 (tests/engines/test_lmcache.py):
LMCache's own storage path (CreateStorageBackends / StorageManager, real MemoryObj
from its allocator, on CPU) driving kvstore through the plugin, by configuration only.

    python lmcache_driver.py ENDPOINTS SAVE_CHUNK_META

Prints one JSON line per "live" phase (chunks of 128 KiB, 16 MiB and 80 MiB);
then it waits for a line on stdin (the test kills a daemon meanwhile) and runs
phase "after_kill" on what the first phase stored."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend import CreateStorageBackends

endpoints, save_meta = sys.argv[1], sys.argv[2] == "1"
PLUGIN = "kvstore"
# One storage loop for the process, as LMCache runs one (grpc.aio serves one event loop per process).
LOOP = asyncio.new_event_loop()
threading.Thread(target=LOOP.run_forever, daemon=True).start()


def engine(kv_shape, chunk: int, tag: str):
    extra = {
        f"remote_storage_plugin.{PLUGIN}.module_path": "kvstore.client.connectors.lmcache",
        f"remote_storage_plugin.{PLUGIN}.class_name": "KVStoreConnector",
        f"remote_storage_plugin.{PLUGIN}.endpoints": endpoints,
        f"remote_storage_plugin.{PLUGIN}.tenant": "lmcache-test",
        f"remote_storage_plugin.{PLUGIN}.subtenant": tag,
        f"remote_storage_plugin.{PLUGIN}.attempt_timeout": 2.0,
        f"remote_storage_plugin.{PLUGIN}.timeout": 4.0,
        "save_chunk_meta": save_meta,
    }
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=chunk, local_cpu=False, max_local_cpu_size=1.0, remote_serde="naive",
        remote_storage_plugins=[PLUGIN], extra_config=extra, lmcache_instance_id=f"t-{tag}",
    )
    metadata = LMCacheMetadata(
        model_name="org/model", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.bfloat16, kv_shape=kv_shape, chunk_size=chunk, role="worker",
    )
    loop = LOOP
    backends = CreateStorageBackends(config, metadata, loop)
    return metadata, backends[f"RemoteBackend-{PLUGIN}"], backends["LocalCPUBackend"], loop


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("org/model", 1, 0, 0x5EED000 + i, torch.bfloat16)


def chunks(metadata, cpu, n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    objs = []
    for _ in range(n):
        obj = cpu.allocate(metadata.get_shapes(), metadata.get_dtypes(), MemoryFormat.KV_2LTD)
        obj.tensor.copy_(torch.randn(obj.get_shape(), generator=generator, dtype=torch.float32).to(torch.bfloat16))
        objs.append(obj)
    return objs


def phase_live(tag: str, kv_shape, chunk: int, n: int) -> dict:
    metadata, remote, cpu, loop = engine(kv_shape, chunk, tag)
    connector = remote.connection.getWrappedConnector()
    moved = connector.zero_copy_puts, connector.zero_copy_gets
    objs = chunks(metadata, cpu, n, seed=n)
    keys = [key(i) for i in range(n)]
    started = time.perf_counter()
    remote.batched_submit_put_task(keys, objs)
    deadline = time.monotonic() + 30
    while remote.batched_contains(keys) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    put_seconds = time.perf_counter() - started
    got = remote.batched_get_blocking(keys)
    exact = [g is not None and torch.equal(g.tensor, o.tensor) for g, o in zip(got, objs)]
    single = remote.get_blocking(keys[0])
    result = {
        "phase": "live", "tag": tag, "chunk_bytes": objs[0].get_size(), "type": type(connector).__name__,
        "contains_all": remote.batched_contains(keys),
        "contains_gap": remote.batched_contains(keys[:2] + [key(10_000)] + keys[2:]),
        "async_contains": asyncio.run_coroutine_threadsafe(remote.batched_async_contains("l", keys), loop).result(30),
        "exact": exact, "single_exact": single is not None and torch.equal(single.tensor, objs[0].tensor),
        "missing": remote.get_blocking(key(10_000)) is None, "put_seconds": put_seconds,
        "failures": connector.failures, "ping": asyncio.run_coroutine_threadsafe(connector.ping(), loop).result(30),
        "pool": connector.pool is not None and connector.pool.zero_copy,
        "zero_copy_puts": connector.zero_copy_puts - moved[0], "zero_copy_gets": connector.zero_copy_gets - moved[1],
    }
    tensors = [o.tensor.clone() for o in objs]
    for obj in [*(g for g in got if g is not None), *([single] if single else []), *objs]:
        obj.ref_count_down()
    return result, (metadata, remote, cpu, loop, connector, keys, tensors)


def phase_after_kill(state) -> dict:
    """What LMCache sees once a daemon is gone: hits (a cluster with replicas) or misses, never an exception."""
    metadata, remote, cpu, loop, connector, keys, tensors = state
    started = time.perf_counter()
    contains = remote.batched_contains(keys)
    got = remote.batched_get_blocking(keys)
    exact = [g is not None and torch.equal(g.tensor, t) for g, t in zip(got, tensors)]
    fresh = chunks(metadata, cpu, 1, seed=7)
    remote.batched_submit_put_task([key(20_000)], fresh)
    time.sleep(0.5)
    fresh[0].ref_count_down()
    for obj in got:
        if obj is not None:
            obj.ref_count_down()
    return {
        "phase": "after_kill", "contains": contains, "got": [g is not None for g in got], "exact": exact,
        "seconds": time.perf_counter() - started, "failures": connector.failures,
    }


small, state = phase_live("small", (4, 2, 16, 8, 64), 16, 8)  # 128 KiB chunks
print(json.dumps(small), flush=True)
big, _ = phase_live("big", (32, 2, 256, 8, 64), 256, 3)  # 16 MiB chunks
print(json.dumps(big), flush=True)
huge, _ = phase_live("huge", (80, 2, 256, 8, 128), 256, 2)  # 80 MiB chunks (80 layers, 8 KV heads of 128)
print(json.dumps(huge), flush=True)
sys.stdin.readline()  # the test kills a daemon now
print(json.dumps(phase_after_kill(state)), flush=True)
