"""LMCache 0.5.6 drives kvstore through its remote-storage plugin
(``kvstore.client.connectors.lmcache``), by configuration only, on CPU torch:
real MemoryObj from LMCache's allocator through LMCache's own storage path
(``CreateStorageBackends``), byte-exact round trips of 128 KiB, 16 MiB and 80 MiB
chunks with LMCache's chunk header and without it (then zero-copy from LMCache's
registered CPU pool), prefix lookups, a daemon killed mid-run giving misses and
never an exception into LMCache, and a 3-daemon cluster with two replicas that
keeps its hits after one daemon is killed.

LMCache lives in environments of its own (``$KVSTORE_ENGINE_VENVS/lmcache-*``,
default under ``~/.cache/kvstore/engines``: 6 GB each, built once in ~2 min and
kept between runs), one with lmcache installed first and then kvstore, one the
other way round; kvstore (the SDK alone) is reinstalled from this tree on every
run, then ``pip check``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kvstore.harness.cluster import LocalCluster
from kvstore.harness.daemon import DaemonProcess
from tests.engines.envs import engine_env, engine_python, run

LMCACHE = "lmcache==0.5.6"
DRIVER = Path(__file__).with_name("lmcache_driver.py")

pytestmark = [pytest.mark.engines, pytest.mark.timeout(1800)]


def lmcache_env(order: str) -> Path:
    """LMCache's venv with kvstore installed after it, or before it (``kvstore-first``)."""
    python = engine_python(f"lmcache-{order}", [LMCACHE], kvstore_first=order == "kvstore-first")
    versions = run(str(python), "-c", "import grpc, google.protobuf, lmcache, kvstore.client; print(grpc.__version__)")
    assert versions.returncode == 0, versions.stderr
    assert versions.stdout.split()[0] == "1.78.0"  # LMCache's pin (through grpcio-observability), left alone
    return python


@pytest.fixture(scope="module", params=["lmcache-first", "kvstore-first"])
def lmcache_python(request) -> Path:
    return lmcache_env(request.param)


def drive(python: Path, endpoints: list[str], save_chunk_meta: bool, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(python), str(DRIVER), ",".join(endpoints), "1" if save_chunk_meta else "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=engine_env(), cwd=cwd,
    )


def live_phases(driver: subprocess.Popen, save_chunk_meta: bool) -> list[dict]:
    phases = []
    for _ in range(3):
        line = driver.stdout.readline()
        assert line, driver.stderr.read()[-3000:]
        phases.append(json.loads(line))
    for phase in phases:
        assert phase["type"] == "KVStoreConnector", phase
        n = len(phase["exact"])
        assert all(phase["exact"]) and phase["single_exact"] and phase["missing"], phase
        assert phase["contains_all"] == phase["async_contains"] == n, phase
        assert phase["contains_gap"] == 2, phase
        assert phase["failures"] == 0 and phase["ping"] == 0, phase
        if save_chunk_meta:
            assert phase["zero_copy_puts"] == phase["zero_copy_gets"] == 0, phase
        else:  # LMCache's pool registered once: every chunk moved in place (batched get, then the single get)
            assert phase["pool"] and phase["zero_copy_puts"] == n and phase["zero_copy_gets"] == n + 1, phase
    assert [p["chunk_bytes"] for p in phases] == [128 << 10, 16 << 20, 80 << 20]
    return phases


def after_kill(driver: subprocess.Popen) -> dict:
    driver.stdin.write("killed\n")
    driver.stdin.flush()
    line = driver.stdout.readline()
    assert line, driver.stderr.read()[-3000:]
    return json.loads(line)


@pytest.mark.parametrize("save_chunk_meta", [True, False], ids=["with-header", "payload-only"])
def test_lmcache_stores_and_loads_through_the_plugin(lmcache_python, tmp_path, save_chunk_meta):
    daemon = DaemonProcess(tmp_path / "data", "--memory", "768MiB").start()
    driver = drive(lmcache_python, [daemon.address], save_chunk_meta, tmp_path)
    try:
        live_phases(driver, save_chunk_meta)
        daemon.kill9()
        dead = after_kill(driver)
        assert dead["contains"] == 0 and not any(dead["got"]), dead  # misses, not exceptions
        assert dead["failures"] >= 1, dead
        assert dead["seconds"] < 30, dead
        assert driver.wait(60) == 0, driver.stderr.read()[-3000:]
    finally:
        driver.kill()
        daemon.kill9()


def test_a_cluster_with_replicas_keeps_serving_lmcache_after_a_daemon_dies(tmp_path):
    """Three daemons, every chunk on two of them: LMCache keeps its hits, byte-exact, once one is killed."""
    python = lmcache_env("lmcache-first")
    cluster = LocalCluster.create(tmp_path / "cluster", 3, replicas=2, memory="768MiB")
    cluster.start()
    driver = drive(python, cluster.endpoints, False, tmp_path)
    try:
        live_phases(driver, False)
        victim = cluster.nodes[0]
        victim.kill9()
        assert not victim.running
        survived = after_kill(driver)
        assert survived["contains"] == len(survived["exact"]) == 8, survived
        assert all(survived["got"]) and all(survived["exact"]), survived
        assert survived["seconds"] < 30, survived
        assert driver.wait(60) == 0, driver.stderr.read()[-3000:]
    finally:
        driver.kill()
        cluster.kill()
