"""The bench's short form runs end to end against a real daemon and writes its table."""

import json

import pytest

from bench.__main__ import main


def _zero_copy_available() -> bool:
    try:
        from kvstore import _native
    except ImportError:
        return False
    return _native.available()


def test_bench_quick_form(tmp_path):
    out = tmp_path / "r.md"
    assert main(["--quick", "--sizes", "64KiB,1MiB", "--no-progress", "--peers", "none", "--output", str(out)]) == 0
    table = out.read_text()
    data = json.loads(out.with_suffix(".json").read_text())  # raw numbers beside the table
    rows = {(r["system"], r["op"], r["concurrency"], r["block_size"]) for r in data["results"]}

    expected = [("memcpy", "copy"), ("loopback TCP", "send"), ("kvstore inline", "put"), ("kvstore inline", "get")]
    if _zero_copy_available():
        expected += [
            ("kvstore zero-copy (shm)", "put"),
            ("kvstore zero-copy (shm)", "get"),
            ("kvstore zero-copy (shm)", "put (disk)"),
            ("kvstore zero-copy (tcp)", "put"),
            ("kvstore zero-copy (tcp)", "get"),
        ]
    else:
        expected.append(("kvstore inline", "put (disk)"))
    for system, op in expected:
        assert f"| {system} | {op} |" in table  # the throughput table
        for size in (64 << 10, 1 << 20):
            for clients in (1, 4):
                assert (system, op, clients, size) in rows, (system, op, clients, size)
    for r in data["results"]:
        assert r["gbps"] > 0 and r["bytes"] > 0
        if r["concurrency"] == 4:
            assert r["calls"] >= 4  # every client process made its calls
    assert "| ×4 |" in table  # the detail table has the 4-client rows
    assert "vs memcpy" in table and "vs TCP" in table
    if _zero_copy_available():
        assert "## Targets" in table and ("PASS" in table or "MISS" in table)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--sizes", "16B"], ["--peers", "nosuchpeer"]])
def test_bench_rejects_bad_arguments(argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--no-progress", "--output", str(tmp_path / "r.md"), *argv])
    assert exc.value.code == 2


def test_every_row_is_the_best_of_its_repeats(tmp_path):
    out = tmp_path / "r.md"
    argv = ["--quick", "--sizes", "64KiB", "--concurrency", "1", "--repeats", "2", "--no-progress", "--peers", "none"]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    assert main([*argv, "--output", str(out), "--data-dir", str(data_dir)]) == 0
    assert list(data_dir.iterdir()) == []  # each run's daemon and data directory were removed after it
    data = json.loads(out.with_suffix(".json").read_text())
    cases = [(r["system"], r["op"], r["concurrency"], r["block_size"]) for r in data["results"]]
    assert len(cases) == len(set(cases)) >= 4  # one row per case, not one per run
    assert data["settings"]["repeats"] == 2
    assert "best of 2 runs of its case" in out.read_text()
