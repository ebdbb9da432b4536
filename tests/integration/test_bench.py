"""The bench's short form runs end to end against a real daemon and writes its table."""

import json

from bench.__main__ import main


def test_bench_quick_form(tmp_path):
    out = tmp_path / "r.md"
    assert main(["--quick", "--sizes", "64KiB,1MiB", "--no-progress", "--peers", "none", "--output", str(out)]) == 0
    table = out.read_text()
    for row in ("put (disk)", "put (memory)", "get", "memcpy", "loopback TCP"):
        assert f"| {row} |" in table
    data = json.loads(out.with_suffix(".json").read_text())
    assert data  # raw numbers beside the table
