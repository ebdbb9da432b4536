"""SGLang 0.5.23 drives kvstore through its HiCache storage backend
(``kvstore.client.connectors.sglang.KVStoreHiCacheStorage``), by configuration
only: SGLang's own factory (``StorageBackendFactory.create_backend("dynamic", ...)``)
loads it by module path, and SGLang's real host pools (``MHATokenToKVPoolHost``
and ``MLATokenToKVPoolHost``, built on CPU) hand it their ``kv_buffer``. Checked:
byte-exact pages for MHA and MLA in the page_first and layer_first layouts,
through ``batch_set_v1``/``batch_get_v1`` (zero-copy: the registered buffer, no
inline copy) and through the flat-page interface; ``batch_exists`` counts
leading hits (a gap stops it); two models or two extra keys never see each
other's pages; a daemon killed gives misses and False, never an exception into
SGLang. The driver also measures the hot path (batch_exists of 64 pages,
batch_get/set_v1 per page), printed for docs/engines/sglang.md.

SGLang lives in an environment of its own (``$KVSTORE_ENGINE_VENVS/sglang``,
default ``~/.cache/kvstore/engines/sglang``: 11 GB with SGLang's CUDA torch,
built once in ~8 min and kept between runs): sglang first, then kvstore (the
SDK alone, rebuilt from this tree on every run), then ``pip check``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kvstore.harness.daemon import DaemonProcess
from tests.engines.envs import engine_env, engine_python, run

SGLANG = "sglang==0.5.23"
DRIVER = Path(__file__).with_name("sglang_driver.py")
LAYOUTS = ("mha-page_first", "mha-layer_first", "mla-page_first", "mla-layer_first")

pytestmark = [pytest.mark.engines, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def sglang_python() -> Path:
    python = engine_python("sglang", [SGLANG])
    probe = "import sglang, kvstore.client.connectors.sglang, google.protobuf as p, grpc; print(sglang.__version__)"
    versions = run(str(python), "-c", probe, timeout=300)
    assert versions.returncode == 0, versions.stderr[-3000:]
    assert versions.stdout.split()[-1] == "0.5.23"
    return python


def test_sglang_stores_and_loads_pages_through_the_dynamic_backend(sglang_python, tmp_path):
    daemon = DaemonProcess(tmp_path / "data", "--memory", "1GiB").start()
    driver = subprocess.Popen(
        [str(sglang_python), str(DRIVER), daemon.address],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=engine_env(), cwd=tmp_path,
    )
    try:
        phases = [json.loads(driver.stdout.readline() or "null") for _ in range(len(LAYOUTS) + 1)]
        assert all(phases), driver.stderr.read()[-5000:] if driver.poll() is not None else phases
        for phase, name in zip(phases, LAYOUTS):
            assert phase["phase"] == name and phase["type"] == "KVStoreHiCacheStorage", phase
            assert phase["before"] == 0 and phase["regions"] == 1, phase
            assert all(phase["stored"]) and all(phase["got"]) and all(phase["exact"]), phase
            assert phase["exists_all"] == 8 and phase["exists_gap"] == 3, phase
            assert phase["exists_one"] and not phase["exists_missing"] and phase["missing_get"] == [False], phase
            # Zero-copy: the registered kv_buffer, every page; nothing inline.
            assert phase["zero_copy"] and phase["stats"]["zero_copy_pages"] == 16, phase
            assert phase["stats"].get("inline_pages", 0) == 0, phase
            assert phase["failures"] == 0 and phase["metrics"] == 1, phase
            # Models and extra keys keep apart.
            assert phase["other_model_exists"] == 0 and all(phase["after_other_model"]) and phase["after_other_model"], phase
            assert phase["salted_differs"] and phase["salted_exists"] == 0, phase
            # The flat-page interface (no interface_v1).
            assert phase["flat_set"] and all(phase["flat_exact"]) and phase["flat_exists"] == 8, phase
            assert phase["flat_failures"] == 0, phase
        assert [p["blocks_per_page"] for p in phases[: len(LAYOUTS)]] == [2, 4, 1, 2]  # K/V; per layer; MLA one; per layer
        costs = phases[-1]
        assert costs["phase"] == "costs"
        for row in costs["rows"]:
            assert row["failures"] == 0 and row["inline_pages"] == 0 and row["zero_copy_pages"] > 0, row
            assert row["lookup_hits"] == row["lookup_pages"], row
        print("\nSGLang hot path (page bytes, durability: lookup of 64 pages p50/p99 ms; set/get per page us, GB/s):")
        for row in costs["rows"]:
            lookup = f"{row['lookup_p50_ms']:.3f}/{row['lookup_p99_ms']:.3f}" if row["lookup_pages"] else "-"
            print(
                f"  {'MLA' if row['mla'] else 'MHA'} {row['page_bytes']:>8} B {row['durability']:<6}"
                f"{' gRPC' if row['grpc'] else ' local'}: lookup {lookup};"
                f" set {row['set_per_page_us']:.0f} us ({row['set_gbps']:.2f} GB/s);"
                f" get {row['get_per_page_us']:.0f} us ({row['get_gbps']:.2f} GB/s)"
            )
        daemon.kill9()
        driver.stdin.write("killed\n")
        driver.stdin.flush()
        dead = json.loads(driver.stdout.readline() or "null")
        assert dead is not None, driver.stderr.read()[-5000:]
        assert dead["raised"] is None, dead  # never an exception into SGLang
        assert dead["exists"] == 0 and not any(dead["got"]) and not any(dead["stored"]), dead
        assert dead["exists_one"] is False and dead["flat_got"] == [False], dead
        assert dead["failures"] >= 1 and dead["seconds"] < 60, dead
        assert driver.wait(60) == 0, driver.stderr.read()[-3000:]
    finally:
        driver.kill()
        daemon.kill9()
