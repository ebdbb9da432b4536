"""The SDK installs inside an engine's environment: importing it (the client, its
CLI, the harness that CLI uses) pulls in none of the daemon's dependencies, so
``pip install kvstore`` can leave them (and the engine's grpcio and protobuf) alone."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from kvstore.server.main import SERVER_MODULES

ROOT = Path(__file__).resolve().parents[2]


def test_the_sdk_and_cli_import_none_of_the_daemons_dependencies():
    """As in an environment without them (grpcio itself tries grpc_health and
    grpc_reflection when they are installed, and takes no for an answer)."""
    probe = (
        "import importlib.abc, sys\n"
        "class Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {SERVER_MODULES!r}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        "import kvstore.client, kvstore.client.cli, kvstore.client.connection, kvstore.harness.health\n"
        "from kvstore.client import SyncClient\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_base_requirements_are_the_sdks_and_the_server_extra_has_the_rest():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in project["dependencies"]}
    assert base == {"grpcio", "protobuf", "xxhash", "pyyaml", "libucx-cu12"}
    server = " ".join(project["optional-dependencies"]["server"]).lower()
    for name in ("grpcio-health-checking", "grpcio-reflection", "rocksdict", "prometheus-client", "aetcd", "uvloop"):
        assert name in server
    assert "grpcio>=1.78,<2" in project["dependencies"] and "protobuf>=6.31.1,<8" in project["dependencies"]


def test_the_daemon_says_which_extra_it_needs(monkeypatch, capsys):
    from kvstore.server import main as server_main

    monkeypatch.setattr(server_main, "missing_server_modules", lambda: ["rocksdict"])
    assert server_main.main(["--version"]) == 2
    assert "pip install 'kvstore[server]'" in capsys.readouterr().err
