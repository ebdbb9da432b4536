"""The bench's lookup-latency table in its short form: every path, call and key count
measured against a real daemon, and the targets judged from the 64-key rows."""

from __future__ import annotations

from bench import lookups


def test_the_lookup_table_measures_every_row_and_judges_the_targets():
    rows = lookups.run(rounds=30, counts=(1, 64))
    measured = {(r["path"], r["call"], r["keys"]) for r in rows}
    for path in ("local channel", "gRPC"):
        for call in ("lookup_prefix", "exists"):
            assert {(path, call, 1), (path, call, 64)} <= measured
    assert ("gRPC", "bare grpc.aio LookupPrefix", 64) in measured
    assert all(0 < r["p50"] <= r["p99"] < 5 for r in rows), rows
    text = lookups.render(rows)
    assert text.count("target ≤") == 2 and ("PASS" in text or "MISS" in text)
