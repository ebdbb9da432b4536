"""``kvstore cluster up|status|down``: real daemons started in the background by
the real CLI, in a folder of the test's own. Whatever a test leaves running is
SIGKILLed by the ``cluster_dir`` fixture, pass or fail."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from kvstore.client import SyncClient
from tests.conftest import kvstore_cli

ETCD = Path("/usr/bin/etcd")


def alive(pid: int, marker: str) -> bool:
    """A live, non-zombie process whose command line names ``marker`` (its data dir)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X") and marker in cmdline


def recorded(directory: Path) -> list[tuple[str, int, str]]:
    """(name, pid, data dir) of every process cluster.json names."""
    try:
        state = json.loads((directory / "cluster.json").read_text())
    except (OSError, ValueError):
        return []
    out = [(n["id"], n["pid"], n["data_dir"]) for n in state["nodes"]]
    if state.get("etcd"):
        out.append(("etcd", state["etcd"]["pid"], state["etcd"]["data_dir"]))
    return out


def running(directory: Path) -> list[str]:
    return [name for name, pid, marker in recorded(directory) if alive(pid, marker)]


@pytest.fixture
def cluster_dir(tmp_path):
    directory = tmp_path / "cluster"
    yield directory
    for _, pid, marker in recorded(directory):
        if alive(pid, marker):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running(directory) and time.monotonic() < deadline:
        time.sleep(0.05)


def cli(*args: str):
    return kvstore_cli("cluster", *args)


def ok(result, code: int = 0):
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == code, (result.returncode, stderr, result.stdout.decode(errors="replace"))
    assert "Traceback" not in stderr, stderr
    return result.stdout.decode()


def status(directory: Path, code: int = 0) -> dict:
    return json.loads(ok(cli("status", "--dir", str(directory), "--json"), code))


def read_back(endpoints: list[str], values: dict[bytes, bytes]) -> None:
    """Every block, byte-exact, through one client given every endpoint."""
    keys = list(values)
    with SyncClient(endpoints=endpoints, transport="inline") as client:
        got = client.get_many(keys)
    missing = [k for k, v in zip(keys, got) if v is None]
    wrong = [k for k, v in zip(keys, got) if v is not None and v != values[k]]
    assert not wrong, f"wrong bytes for {wrong[:5]}"
    assert not missing, f"{len(missing)} of {len(keys)} blocks not found, e.g. {missing[:5]}"


def test_up_status_kill_down_up(cluster_dir):
    d = str(cluster_dir)

    # -- up: three daemons on loopback, endpoints printed ---------------------------
    out = ok(cli("up", "--nodes", "3", "--dir", d, "--memory", "64MiB", "--replicas", "2", "--write-quorum", "1"))
    lines = out.strip().splitlines()
    endpoints = lines[-2].split(",")
    assert lines[-1] == "export KVSTORE_ENDPOINTS=" + lines[-2]
    assert len(endpoints) == 3 and all(e.startswith("127.0.0.1:") for e in endpoints)
    state = json.loads((cluster_dir / "cluster.json").read_text())
    assert [n["id"] for n in state["nodes"]] == ["node1", "node2", "node3"]
    assert [n["address"] for n in state["nodes"]] == endpoints
    for k, node in enumerate(state["nodes"], 1):
        assert node["data_dir"] == str(cluster_dir.resolve() / f"node{k}" / "data")
        assert "listening on " + node["address"] in Path(node["log"]).read_text()
    assert sorted(running(cluster_dir)) == ["node1", "node2", "node3"]

    # -- status: every node up, one map -------------------------------------------
    report = status(cluster_dir)
    assert (report["up"], report["total"]) == (3, 3)
    nodes = report["nodes"]
    assert [n["id"] for n in nodes] == ["node1", "node2", "node3"]
    assert all(n["health"] == "up" and n["error"] is None for n in nodes)
    assert len(report["epochs"]) == 1 and nodes[0]["epoch"] > 0  # the same epoch on every node
    # Multi-node cluster map: every daemon's GetClusterMap names all three members
    # (a daemon that only knew itself would list just its own id here).
    assert all(n["members"] == ["node1", "node2", "node3"] for n in nodes)
    assert all((n["replicas"], n["write_quorum"]) == (2, 1) for n in nodes)
    assert all(n["rebalance"]["state"] in ("idle", "running", "waiting") for n in nodes)
    assert all(set(n["tiers"]) >= {"memory", "disk"} for n in nodes)
    text = ok(cli("status", "--dir", d))
    assert text.startswith(f"3 of 3 nodes up in {cluster_dir.resolve()}, epoch {nodes[0]['epoch']}")
    # Endpoints instead of the folder: the same nodes.
    by_endpoint = json.loads(ok(kvstore_cli("cluster", "status", "--endpoint", ",".join(endpoints), "--json")))
    assert [n["id"] for n in by_endpoint["nodes"]] == ["node1", "node2", "node3"]

    # A second up on a running cluster refuses.
    again = cli("up", "--dir", d)
    assert again.returncode == 1 and b"already running" in again.stderr, again.stderr

    # -- data through one client given all three endpoints ---------------------------
    rng = random.Random(4)
    values = {f"block-{i}".encode(): rng.randbytes(rng.randrange(1, 40_000)) for i in range(40)}
    # Inline transfers: this test is about processes, not the zero-copy data plane.
    with SyncClient(endpoints=endpoints, transport="inline") as client:
        client.put_many(values.items(), durability="sync")  # on disk before the kill -9 below
    read_back(endpoints, values)
    stored = status(cluster_dir)
    assert sum(n["tiers"]["disk"]["blocks"] for n in stored["nodes"]) >= len(values)

    # -- kill -9 one daemon: shown down, exit 1, no crash -----------------------------
    victim = state["nodes"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(victim["pid"], victim["data_dir"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    report = status(cluster_dir, code=1)
    assert [n["health"] for n in report["nodes"]] == ["up", "down", "up"]
    assert report["nodes"][1]["id"] == "node2" and report["nodes"][1]["error"]
    text = ok(cli("status", "--dir", d), code=1)
    assert text.startswith("2 of 3 nodes up") and "node2" in text and "down" in text

    # up on a partly running cluster starts just the node that is down, on its port.
    out = ok(cli("up", "--dir", d))
    assert out.strip().splitlines()[-2].split(",") == endpoints
    new_state = json.loads((cluster_dir / "cluster.json").read_text())
    assert [n["pid"] for n in new_state["nodes"]][::2] == [n["pid"] for n in state["nodes"]][::2]
    assert new_state["nodes"][1]["pid"] != victim["pid"]
    assert status(cluster_dir)["up"] == 3

    # -- down: every process gone ------------------------------------------------------
    out = ok(cli("down", "--dir", d))
    assert out.split().count("stopped") == 3, out
    pids = recorded(cluster_dir)
    assert running(cluster_dir) == [], pids
    report = status(cluster_dir, code=1)
    assert [n["health"] for n in report["nodes"]] == ["down"] * 3

    # -- up again: same ports, same data, same map -----------------------------------
    out = ok(cli("up", "--dir", d))
    assert out.strip().splitlines()[-2].split(",") == endpoints
    assert sorted(running(cluster_dir)) == ["node1", "node2", "node3"]
    assert not {pid for _, pid, _ in recorded(cluster_dir)} & {pid for _, pid, _ in pids}
    again = status(cluster_dir)
    assert again["epochs"] == stored["epochs"]  # static peers: the map is a digest of the same list
    read_back(endpoints, values)

    ok(cli("down", "--dir", d))
    assert running(cluster_dir) == []


def test_up_rejects_a_changed_shape_and_down_without_cluster(cluster_dir, tmp_path):
    empty = tmp_path / "nothing"
    result = cli("down", "--dir", str(empty))
    assert result.returncode == 2 and b"no cluster in" in result.stderr
    result = cli("status", "--dir", str(empty))
    assert result.returncode == 2 and b"no cluster in" in result.stderr
    # A recorded (stopped) cluster keeps its shape.
    (cluster_dir / "node1").mkdir(parents=True)
    (cluster_dir / "cluster.json").write_text(json.dumps({
        "nodes": [{"id": "node1", "port": 1, "data_dir": str(cluster_dir / "node1" / "data"),
                   "log": str(cluster_dir / "node1" / "server.log"), "pid": 0}],
    }))
    result = cli("up", "--nodes", "2", "--dir", str(cluster_dir))
    assert result.returncode == 2 and b"--nodes 1" in result.stderr, result.stderr
    assert running(cluster_dir) == []


@pytest.mark.skipif(not ETCD.exists(), reason="needs /usr/bin/etcd (apt-get install etcd-server)")
def test_etcd_cluster(cluster_dir):
    d = str(cluster_dir)
    out = ok(cli("up", "--nodes", "2", "--etcd", "--dir", d, "--memory", "64MiB"))
    endpoints = out.strip().splitlines()[-2].split(",")
    state = json.loads((cluster_dir / "cluster.json").read_text())
    assert state["etcd"]["pid"] and state["etcd"]["data_dir"] == str(cluster_dir.resolve() / "etcd" / "data")
    assert sorted(running(cluster_dir)) == ["etcd", "node1", "node2"]
    for node in state["nodes"]:
        assert "--etcd " + state["etcd"]["endpoint"] in Path(node["log"]).read_text()

    report = status(cluster_dir)
    assert report["etcd"]["health"] == "up"
    assert [n["health"] for n in report["nodes"]] == ["up", "up"]
    assert len(report["epochs"]) == 1  # both daemons learned the same membership from etcd
    assert all(n["members"] == ["node1", "node2"] for n in report["nodes"])

    with SyncClient(endpoints=endpoints, transport="inline") as client:
        client.put(b"etcd-block", b"x" * 1000, durability="sync")
    read_back(endpoints, {b"etcd-block": b"x" * 1000})

    out = ok(cli("down", "--dir", d))
    assert "etcd" in out and out.split().count("stopped") == 3, out
    assert running(cluster_dir) == []
