"""``python -m bench cluster`` in its quick form, smallest volume: real daemons of 1, 2 and 3
nodes and R=2 on 3, each stopped and its data removed; a table with every row."""

import json

import pytest

from bench.__main__ import main


@pytest.mark.timeout(180)  # a hung daemon or client fails the test rather than the suite
def test_bench_cluster_quick_form(tmp_path):
    out = tmp_path / "cluster.md"
    data_parent = tmp_path / "data"
    argv = ["cluster", "--quick", "--volume", "1MiB", "--no-progress", "--dir", str(data_parent), "--output", str(out)]
    assert main(argv) == 0
    table = out.read_text()
    data = json.loads(out.with_suffix(".json").read_text())

    rows = {(r["daemons"], r["replicas"]): r for r in data["rows"]}
    assert set(rows) == {(1, 1), (2, 1), (3, 1), (3, 2)}
    for row in rows.values():
        for op in ("put", "get"):
            assert row[op]["gbps"] > 0 and row[op]["bytes"] > 0
        assert row["daemon_exit_status"] == [[0] * row["daemons"]]  # one run, a clean SIGTERM drain
        assert len(row["nodes"]) == row["daemons"]
    assert rows[(3, 2)]["write_quorum"] == 2
    assert rows[(1, 1)]["vs_one_daemon"]["put"] == 1.0
    assert rows[(3, 2)]["vs_r1"]["put"] > 0

    # Table rows: "| daemons | replicas | put GB/s | ..." for 1, 2, 3 daemons, then R=2 on 3.
    def cells(prefix: str) -> list[str]:
        line = next(line for line in table.splitlines() if line.startswith(prefix))
        return [c.strip() for c in line.strip("|").split("|")]

    for prefix in ("| 1 | 1 |", "| 2 | 1 |", "| 3 | 1 |", "| 3 | 2 (2) |"):
        row = cells(prefix)
        put_gbps, get_gbps = float(row[2]), float(row[4])
        assert put_gbps > 0 and get_gbps > 0, row
    assert "bounded by the machine" in table
    assert "zero-copy" in table or "inline" in table

    # Every configuration's data dirs are gone.
    assert not any(data_parent.iterdir())
