"""LMCache 0.5.6 drives kvstore through its remote-storage plugin
(``kvstore.client.connectors.lmcache``), by configuration only, on CPU torch:
real MemoryObj from LMCache's allocator through LMCache's own storage path
(``CreateStorageBackends``), byte-exact round trips of small and 16 MiB chunks
with and without LMCache's chunk header, prefix lookups, and a daemon killed
mid-run giving misses, never an exception into LMCache.

LMCache lives in an environment of its own (``$KVSTORE_ENGINE_VENVS/lmcache``,
default ``~/.cache/kvstore/engines/lmcache``: 6 GB, built once in ~2 min and kept
between runs): lmcache first, then kvstore (the SDK alone, rebuilt from this tree
on every run), then ``pip check``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kvstore.harness.daemon import DaemonProcess
from tests.engines.envs import engine_env, engine_python, run

LMCACHE = "lmcache==0.5.6"
DRIVER = Path(__file__).with_name("lmcache_driver.py")

pytestmark = [pytest.mark.engines, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def lmcache_python() -> Path:
    python = engine_python("lmcache", [LMCACHE])
    versions = run(str(python), "-c", "import grpc, google.protobuf, lmcache, kvstore.client; print(grpc.__version__)")
    assert versions.returncode == 0, versions.stderr
    assert versions.stdout.split()[0] == "1.78.0"  # LMCache's pin (through grpcio-observability), left alone
    return python


@pytest.mark.parametrize("save_chunk_meta", [True, False], ids=["with-header", "payload-only"])
def test_lmcache_stores_and_loads_through_the_plugin(lmcache_python, tmp_path, save_chunk_meta):
    daemon = DaemonProcess(tmp_path / "data", "--memory", "512MiB").start()
    driver = subprocess.Popen(
        [str(lmcache_python), str(DRIVER), daemon.address, "1" if save_chunk_meta else "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=engine_env(), cwd=tmp_path,
    )
    try:
        phases = [json.loads(driver.stdout.readline()) for _ in range(2)]
        for phase in phases:
            assert phase["type"] == "KVStoreConnector", phase
            n = len(phase["exact"])
            assert all(phase["exact"]) and phase["single_exact"] and phase["missing"], phase
            assert phase["contains_all"] == phase["async_contains"] == n, phase
            assert phase["contains_gap"] == 2, phase
            assert phase["failures"] == 0 and phase["ping"] == 0, phase
        assert phases[1]["chunk_bytes"] == 16 << 20
        daemon.kill9()
        driver.stdin.write("killed\n")
        driver.stdin.flush()
        dead = json.loads(driver.stdout.readline())
        assert dead["contains"] == 0 and all(dead["got"]), dead  # misses, not exceptions
        assert dead["failures"] >= 1, dead
        assert dead["seconds"] < 30, dead
        assert driver.wait(60) == 0, driver.stderr.read()[-3000:]
    finally:
        driver.kill()
        daemon.kill9()
