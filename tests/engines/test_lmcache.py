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
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.harness.daemon import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
VENVS = Path(os.environ.get("KVSTORE_ENGINE_VENVS") or Path.home() / ".cache" / "kvstore" / "engines")
VENV = VENVS / "lmcache"
LMCACHE = "lmcache==0.5.6"
DRIVER = Path(__file__).with_name("lmcache_driver.py")

pytestmark = [pytest.mark.engines, pytest.mark.timeout(1800)]


def run(*command: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    # Not from the source tree: its kvstore/ would shadow the installed package.
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=VENVS)


@pytest.fixture(scope="module")
def lmcache_python() -> Path:
    python = VENV / "bin" / "python"
    stamp = VENV / ".lmcache-installed"
    if not stamp.exists() or stamp.read_text() != LMCACHE:
        VENVS.mkdir(parents=True, exist_ok=True)
        run(sys.executable, "-m", "venv", "--clear", str(VENV))
        installed = run(str(python), "-m", "pip", "install", "--quiet", LMCACHE)
        if installed.returncode != 0:
            pytest.skip(f"{LMCACHE} does not install here: {installed.stderr[-500:]}")
        stamp.write_text(LMCACHE)
    # kvstore after LMCache, the SDK alone (its dependencies the first time), then this
    # tree's code; built outside the source tree's own build dir.
    build = ("-C", f"build-dir={VENV / 'kvstore-build'}")
    for extra in ((), ("--force-reinstall", "--no-deps")):
        kvstore = run(str(python), "-m", "pip", "install", "--quiet", *extra, *build, str(ROOT))
        assert kvstore.returncode == 0, kvstore.stderr[-3000:]
    check = run(str(python), "-m", "pip", "check")
    assert check.returncode == 0, f"pip check after installing kvstore beside LMCache:\n{check.stdout}{check.stderr}"
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
        env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path,
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
