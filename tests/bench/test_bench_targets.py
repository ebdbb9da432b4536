"""The bench's target checks (bench/report.py): ratios from rows of the same run,
and a target above what the machine itself moves on that path reported as such."""

from __future__ import annotations

from bench.measure import GB, Result, best_runs
from bench.report import MEMCPY, TCP, Index, targets

MIB = 1 << 20


def row(system: str, op: str, gbps: float) -> Result:
    blocks = 1024
    return Result(f"{system} {op}", MIB, blocks, blocks * MIB / (gbps * GB), system=system, op=op, concurrency=1)


def checks(rows):
    return {(t["system"], t["op"], t["reference"]): t for t in targets(Index(rows))}


def test_verdicts_from_the_same_run():
    got = checks([
        row(MEMCPY, "copy", 20.0), row(TCP, "send", 3.0),
        row("kvstore zero-copy (shm)", "put", 15.0), row("kvstore zero-copy (shm)", "get", 10.0),
        row("kvstore zero-copy (tcp)", "put", 1.4), row("kvstore zero-copy (tcp)", "get", 2.4),
        row("redis", "put", 1.0), row("redis", "get", 0.2),
        row("mooncake (tcp)", "put", 1.9), row("mooncake (tcp)", "get", 1.9),
    ])
    shm_put = got[("kvstore zero-copy (shm)", "put", MEMCPY)]
    assert shm_put["verdict"] == "PASS" and abs(shm_put["ratio"] - 0.75) < 1e-9
    assert got[("kvstore zero-copy (shm)", "get", MEMCPY)]["verdict"] == "MISS"  # 0.5×
    assert got[("kvstore zero-copy (shm)", "put", "redis")]["verdict"] == "PASS"  # 15×
    assert got[("kvstore zero-copy (tcp)", "put", "mooncake (tcp)")]["verdict"] == "MISS"
    assert got[("kvstore zero-copy (tcp)", "get", "mooncake (tcp)")]["verdict"] == "PASS"  # 1.26×
    # 5× Redis put is 5 GB/s, more than the 3 GB/s the loopback socket moves in this run.
    above = got[("kvstore zero-copy (tcp)", "put", "redis")]
    assert above["verdict"] == "ABOVE LIMIT" and above["ceiling"] == TCP and above["ceiling_gbps"] == 3.0
    # 5× Redis get is 1 GB/s, within the socket's reach, and met.
    assert got[("kvstore zero-copy (tcp)", "get", "redis")]["verdict"] == "PASS"
    assert {t["reference"] for t in got.values() if t["verdict"] == "n/a"} == {"mooncake (shm)"}  # not in this run


def test_a_reachable_target_that_is_missed_stays_a_miss():
    got = checks([row(TCP, "send", 10.0), row("kvstore zero-copy (tcp)", "put", 1.4), row("redis", "put", 1.0)])
    assert got[("kvstore zero-copy (tcp)", "put", "redis")]["verdict"] == "MISS"
    assert got[("kvstore zero-copy (tcp)", "put", TCP)]["verdict"] == "MISS"  # 0.14×


def test_a_reference_that_did_not_run_is_not_a_verdict():
    got = checks([row("kvstore zero-copy (shm)", "put", 5.0)])
    assert {t["verdict"] for t in got.values()} == {"n/a"}


def test_every_case_keeps_its_fastest_run_in_first_run_order():
    runs = [
        row(MEMCPY, "copy", 12.0), row("kvstore zero-copy (shm)", "put", 9.0),
        row(MEMCPY, "copy", 20.0), row("kvstore zero-copy (shm)", "put", 8.0),
        row("kvstore zero-copy (shm)", "put", 11.0), row("redis", "put", 1.0),
    ]
    four = Result("redis put", MIB, 1024, 1024 * MIB / (3.0 * GB), system="redis", op="put", concurrency=4)
    kept = best_runs([*runs, four])
    assert [(r.system, r.op, r.concurrency, round(r.gbps, 6)) for r in kept] == [
        (MEMCPY, "copy", 1, 20.0),
        ("kvstore zero-copy (shm)", "put", 1, 11.0),
        ("redis", "put", 1, 1.0),
        ("redis", "put", 4, 3.0),  # another client count is another case
    ]
    assert best_runs([]) == []
