"""The ``kvstore`` CLI, run as a subprocess against the shared in-process daemon,
each test in a tenant of its own."""

from __future__ import annotations

import json
import random

import pytest

from kvstore.client import SyncClient
from tests.conftest import kvstore_cli


@pytest.fixture
def kv(daemon, tenant):
    """Run the CLI against the shared daemon in this test's tenant."""

    def run(*args: str, input: bytes | None = None, env: dict | None = None):
        return kvstore_cli("--endpoint", daemon.address, "--tenant", tenant, *args, input=input, env=env)

    return run


@pytest.fixture
def sdk(daemon, tenant):
    with SyncClient(daemon.address, tenant=tenant) as client:
        yield client


def ok(result, stdout_empty: bool = False):
    assert result.returncode == 0, (result.returncode, result.stderr.decode(errors="replace"))
    assert b"Traceback" not in result.stderr
    if stdout_empty:
        assert result.stdout == b""
    return result


def as_json(result):
    return json.loads(result.stdout.decode())


def no_traceback(result, code: int):
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == code, (result.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("kvstore: "), stderr
    return stderr


def binary(n: int, seed: int = 0) -> bytes:
    """Every byte value, newlines and NULs included, then random bytes."""
    return (bytes(range(256)) * 2 + random.Random(seed).randbytes(n))[:n]


# -- put and get ------------------------------------------------------------


def test_put_file_then_get_to_stdout(kv, sdk, tmp_path):
    value = binary(300_000)
    src = tmp_path / "block.bin"
    src.write_bytes(value)
    put = ok(kv("put", "block-0", str(src)))
    assert put.stdout.decode().strip() == "stored block-0 (300000 bytes)"
    assert sdk.get(b"block-0") == value  # stored under the key's UTF-8 bytes, in this tenant
    got = ok(kv("get", "block-0"))
    assert got.stdout == value
    assert got.stderr == b""


def test_put_stdin_then_get_to_file(kv, sdk, tmp_path):
    value = binary(3 << 20, seed=1)
    ok(kv("put", "from-stdin", "-", input=value))
    assert sdk.get(b"from-stdin") == value
    out = tmp_path / "out.bin"
    got = ok(kv("get", "from-stdin", "-o", str(out)))
    assert out.read_bytes() == value
    assert got.stdout.decode().strip() == f"wrote {len(value)} bytes to {out}"
    # --output is the long form, and it overwrites.
    out.write_bytes(b"old contents that are longer than the value")
    ok(kv("put", "small", "-", input=b"\x00\n\xff"))
    ok(kv("get", "small", "--output", str(out)))
    assert out.read_bytes() == b"\x00\n\xff"


def test_put_empty_stdin_and_overwrite(kv, sdk):
    ok(kv("put", "k", "-", input=b"first value"))
    ok(kv("put", "k", "-", input=b"second"))
    assert ok(kv("get", "k")).stdout == b"second"
    assert sdk.stat()["blocks"] == 1


@pytest.mark.parametrize("durability", ["memory", "disk", "sync"])
def test_put_durability(kv, sdk, durability):
    value = binary(10_000, seed=3)
    ok(kv("put", f"d-{durability}", "-", "--durability", durability, input=value))
    assert sdk.get(f"d-{durability}".encode()) == value


def test_get_missing_key_exits_1(kv):
    result = kv("get", "no-such-key")
    stderr = no_traceback(result, 1)
    assert "no-such-key" in stderr and "not found" in stderr
    assert result.stdout == b""


def test_get_missing_key_to_file_leaves_no_file(kv, tmp_path):
    out = tmp_path / "never.bin"
    no_traceback(kv("get", "no-such-key", "-o", str(out)), 1)
    assert not out.exists()


def test_put_unreadable_file_is_an_error(kv, sdk, tmp_path):
    stderr = no_traceback(kv("put", "k", str(tmp_path / "missing.bin")), 2)
    assert "missing.bin" in stderr
    assert sdk.exists([b"k"]) == [False]


def test_get_to_unwritable_path_is_an_error(kv, sdk, tmp_path):
    sdk.put(b"k", b"value")
    stderr = no_traceback(kv("get", "k", "-o", str(tmp_path / "no-dir" / "out.bin")), 2)
    assert "no-dir" in stderr


def test_tenant_and_subtenant_scope_keys(daemon, kv, sdk, tenant):
    ok(kv("--subtenant", "other", "put", "k", "-", input=b"in other"))
    with SyncClient(daemon.address, tenant=tenant, subtenant="other") as other:
        assert other.get(b"k") == b"in other"
    assert sdk.get(b"k") is None
    no_traceback(kv("get", "k"), 1)
    assert ok(kv("--subtenant", "other", "get", "k")).stdout == b"in other"
    stranger = kvstore_cli("--endpoint", daemon.address, "--tenant", tenant + "-x", "--subtenant", "other", "get", "k")
    no_traceback(stranger, 1)


# -- exists, rm, ls ---------------------------------------------------------


def test_exists(kv, sdk):
    sdk.put_many([(b"a", b"1"), (b"b", b"22")])
    both = ok(kv("exists", "a", "b"))
    assert both.stdout.decode().splitlines() == ["a\tyes", "b\tyes"]
    some = kv("exists", "a", "missing", "b")
    assert some.returncode == 1, some.stderr
    assert b"Traceback" not in some.stderr
    assert some.stdout.decode().splitlines() == ["a\tyes", "missing\tno", "b\tyes"]
    none = kv("exists", "missing")
    assert none.returncode == 1
    assert none.stdout.decode().splitlines() == ["missing\tno"]


def test_rm_prints_how_many_existed(kv, sdk):
    sdk.put_many([(b"x", b"1"), (b"y", b"2"), (b"z", b"3")])
    result = ok(kv("rm", "x", "y", "missing"))
    assert result.stdout.decode().strip() == "deleted 2 of 3"
    assert sdk.exists([b"x", b"y", b"z"]) == [False, False, True]
    again = ok(kv("rm", "x"))
    assert again.stdout.decode().strip() == "deleted 0 of 1"
    assert sdk.stat()["blocks"] == 1


def test_ls_and_prefix(kv, sdk):
    sizes = {b"layer/0": 10, b"layer/1": 2000, b"layer/10": 1, b"other": 7, b"lay": 3}
    sdk.put_many([(k, b"v" * n) for k, n in sizes.items()])
    lines = ok(kv("ls")).stdout.decode().splitlines()
    assert lines == [f"{sizes[k]}\t{k.decode()}" for k in sorted(sizes)]
    lines = ok(kv("ls", "--prefix", "layer/")).stdout.decode().splitlines()
    assert lines == ["10\tlayer/0", "2000\tlayer/1", "1\tlayer/10"]
    lines = ok(kv("ls", "--prefix", "layer/1")).stdout.decode().splitlines()
    assert lines == ["2000\tlayer/1", "1\tlayer/10"]
    assert ok(kv("ls", "--prefix", "nothing")).stdout.decode().strip() == ""
    lines = ok(kv("ls", "--limit", "2")).stdout.decode().splitlines()
    assert lines == [f"{sizes[k]}\t{k.decode()}" for k in sorted(sizes)[:2]]


def test_ls_empty_namespace(kv):
    assert ok(kv("ls")).stdout.decode().strip() == ""


def test_stat_human(kv, sdk, tenant):
    sdk.put_many([(b"s1", b"x" * 1000), (b"s2", b"y" * 24)])
    out = ok(kv("stat")).stdout.decode()
    lines = out.splitlines()
    assert any(line.startswith("memory") for line in lines), out
    assert any(line.startswith("disk") for line in lines), out
    assert "data dir" in out and "uptime" in out
    mine = [line for line in lines if f"{tenant}/default" in line]
    assert len(mine) == 1, out
    assert "2 blocks" in mine[0] and "1.0 KiB" in mine[0], mine[0]


# -- --json -----------------------------------------------------------------


def test_json_put_get_and_miss(kv, tmp_path):
    value = binary(5000, seed=4)
    assert as_json(ok(kv("--json", "put", "j", "-", input=value))) == {"key": "j", "bytes": 5000}
    got = as_json(ok(kv("--json", "get", "j")))
    assert got["found"] is True and got["key"] == "j" and got["bytes"] == 5000
    assert bytes.fromhex(got["value_hex"]) == value
    out = tmp_path / "j.bin"
    got = as_json(ok(kv("--json", "get", "j", "-o", str(out))))
    assert got == {"key": "j", "found": True, "bytes": 5000, "output": str(out)}
    assert out.read_bytes() == value
    miss = kv("--json", "get", "nope")
    assert miss.returncode == 1
    assert as_json(miss) == {"key": "nope", "found": False}
    assert b"not found" in miss.stderr


def test_json_exists_rm_ls(kv, sdk):
    sdk.put_many([(b"p/1", b"a" * 5), (b"p/2", b"b" * 6), (b"q", b"c")])
    result = kv("--json", "exists", "p/1", "gone", "q")
    assert result.returncode == 1
    assert as_json(result) == {"p/1": True, "gone": False, "q": True}
    assert as_json(ok(kv("--json", "exists", "q"))) == {"q": True}
    assert as_json(ok(kv("--json", "ls"))) == [
        {"key": "p/1", "bytes": 5},
        {"key": "p/2", "bytes": 6},
        {"key": "q", "bytes": 1},
    ]
    assert as_json(ok(kv("--json", "ls", "--prefix", "p/"))) == [{"key": "p/1", "bytes": 5}, {"key": "p/2", "bytes": 6}]
    assert as_json(ok(kv("--json", "rm", "p/1", "q", "gone"))) == {"deleted": 2, "requested": 3}
    assert as_json(ok(kv("--json", "ls"))) == [{"key": "p/2", "bytes": 6}]
    assert as_json(ok(kv("--json", "ls", "--prefix", "zzz"))) == []


def test_json_stat(kv, sdk, daemon, tenant):
    sdk.put_many([(b"a", b"x" * 100), (b"b", b"y" * 28)])
    stats = as_json(ok(kv("--json", "stat")))
    assert stats["address"] == daemon.address
    assert set(stats["tiers"]) == {"memory", "disk"}
    for tier in stats["tiers"].values():
        assert tier["blocks"] >= 2 and tier["bytes"] >= 128 and tier["capacity_bytes"] > 0
    assert stats["tiers"]["memory"]["capacity_bytes"] == daemon.config.memory
    assert isinstance(stats["corrupt_blocks"], int) and isinstance(stats["evictions"], int)
    assert stats["namespaces"] >= 1
    assert stats["uptime_seconds"] >= 0
    mine = [ns for ns in stats["namespace_list"] if ns["tenant"] == tenant]
    assert mine == [{"tenant": tenant, "subtenant": "default", "blocks": 2, "bytes": 128}]


# -- hex: keys --------------------------------------------------------------


def test_hex_keys(kv, sdk):
    key = b"\x00\xff\x10\n"
    ok(kv("put", "hex:00ff100a", "-", input=b"raw key"))
    assert sdk.get(key) == b"raw key"
    assert ok(kv("get", "hex:00FF100A")).stdout == b"raw key"  # hex digits in either case
    assert ok(kv("ls")).stdout.decode().splitlines() == ["7\thex:00ff100a"]
    assert as_json(ok(kv("--json", "ls"))) == [{"key": "hex:00ff100a", "bytes": 7}]
    assert ok(kv("exists", "hex:00ff100a")).stdout.decode().strip() == "hex:00ff100a\tyes"
    # A text key that itself starts with "hex:" is shown in hex, so it round-trips.
    sdk.put(b"hex:zz", b"tricky")
    listed = [e["key"] for e in as_json(ok(kv("--json", "ls")))]
    assert "hex:" + b"hex:zz".hex() in listed
    assert ok(kv("get", "hex:" + b"hex:zz".hex())).stdout == b"tricky"
    sdk.put(b"hi", b"!")
    assert ok(kv("get", "hex:6869")).stdout == b"!"  # hex: names any key, printable or not
    assert as_json(ok(kv("--json", "rm", "hex:00ff100a", "hex:6869"))) == {"deleted": 2, "requested": 2}
    assert sdk.exists([key, b"hi"]) == [False, False]


def test_bad_hex_key_is_an_error(kv):
    stderr = no_traceback(kv("get", "hex:zz"), 2)
    assert "hex" in stderr


# -- bad endpoints ------------------------------------------------------------

FAST_CONNECT = {"KVSTORE_CONNECT_TIMEOUT": "1"}


@pytest.mark.parametrize("args", [("get", "k"), ("put", "k", "-"), ("stat",), ("ls",)])
def test_unreachable_endpoint(args):
    result = kvstore_cli("--endpoint", "127.0.0.1:1", *args, input=b"v", env=FAST_CONNECT)
    stderr = no_traceback(result, 2)
    assert "127.0.0.1:1" in stderr
    assert result.stdout == b""


def test_unreachable_endpoint_json_error():
    result = kvstore_cli("--endpoint", "127.0.0.1:1", "--json", "exists", "k", env=FAST_CONNECT)
    no_traceback(result, 2)
    error = as_json(result)
    assert error["error"] == "UnavailableError" and "127.0.0.1:1" in error["message"]


@pytest.mark.parametrize("endpoint", ["nonsense", "127.0.0.1:99999", ""])
def test_malformed_endpoint(endpoint):
    result = kvstore_cli("--endpoint", endpoint, "get", "k", env=FAST_CONNECT)
    stderr = no_traceback(result, 2)
    assert "endpoint" in stderr


def test_bad_tenant_is_an_error(daemon):
    stderr = no_traceback(kvstore_cli("--endpoint", daemon.address, "--tenant", "no spaces", "ls"), 2)
    assert "tenant" in stderr
