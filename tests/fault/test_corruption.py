"""Damaged segment files: a block whose bytes on disk no longer match must be a
miss (never the wrong bytes), counted as corrupt, and dropped; every other
block stays intact and the daemon keeps serving.

Each test writes through a subprocess daemon, stops it (so the memory tier
cannot serve the block), damages DATA_DIR/segments/*.seg, and restarts it on
the same data directory, port and metrics port.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

import pytest

from kvstore.client import SyncClient
from kvstore.namespace import Namespace
from tests.conftest import free_port, kvstore_cli
from tests.fault.support import flip, locate, metric, segment_files

MAGIC = b"KVB1"
# Record header, little endian: magic 4s | key length u16 | flags u16 | value length u64 |
# xxh3-64 u64 | sequence u64 | crc32 u32; then the storage key, then the value.
# A byte inside each field:
HEADER_FIELDS = {"magic": 1, "key_length": 4, "value_length": 10, "checksum": 19, "crc": 33}
HEADER_SIZE = 36


def recognizable(rng: random.Random, key: bytes, size: int) -> bytes:
    """Random bytes with a marker, unique enough to be found in a segment file."""
    marker = b"<<" + key + b">>"
    return (marker + rng.randbytes(size))[:size] if size >= 64 else rng.randbytes(size)


class Scenario:
    """A tenant's blocks written through a subprocess daemon that exports metrics."""

    def __init__(self, daemon_process, tmp_path: Path, sizes: dict[bytes, int], seed: int = 1) -> None:
        self.data_dir = tmp_path / "data"
        self.metrics_port = free_port()
        self.proc = daemon_process("--memory", "64MiB", "--metrics-port", str(self.metrics_port), data_dir=self.data_dir)
        self.tenant = "corrupt-" + uuid.uuid4().hex[:10]
        rng = random.Random(seed)
        self.values = {key: recognizable(rng, key, size) for key, size in sizes.items()}

    def write(self, values: dict[bytes, bytes] | None = None) -> None:
        with self.client() as client:
            assert client.put_many(list((values or self.values).items())) == len(values or self.values)

    def client(self) -> SyncClient:
        return SyncClient(self.proc.address, tenant=self.tenant)

    def stop(self) -> None:
        assert self.proc.terminate() == 0, "".join(self.proc.log)

    def storage_key(self, key: bytes) -> bytes:
        return Namespace(self.tenant, "default").storage_key(key)

    def header_offset(self, key: bytes) -> tuple[Path, int]:
        path, value_at = locate(self.data_dir, self.values[key])
        key_at = value_at - len(self.storage_key(key))
        start = key_at - HEADER_SIZE
        data = path.read_bytes()
        assert data[key_at:value_at] == self.storage_key(key), "the record layout is not header + key + value"
        assert data[start : start + 4] == MAGIC, "the record header is not where the layout puts it"
        return path, start

    def check_after_damage(self, victims: list[bytes]) -> None:
        """The damaged blocks are misses, the rest exact, the damage counted, the victims gone."""
        keys = list(self.values)
        with self.client() as client:
            got = client.get_many(keys)
            for key, value in zip(keys, got):
                if key in victims:
                    if value is not None:
                        same = "its original bytes" if value == self.values[key] else "WRONG bytes"
                        pytest.fail(f"damaged block {key!r} was served ({len(value)} bytes, {same}) instead of a miss")
                elif value != self.values[key]:
                    pytest.fail(f"intact block {key!r} came back wrong: {None if value is None else len(value)}")
            for key in victims:  # a second read is a miss too
                assert client.get(key) is None
            stats = client.server_stats()
            assert stats["corrupt_blocks"] == len(victims), stats
            assert metric(self.metrics_port, "kvstore_corrupt_blocks") == len(victims)
            cli = kvstore_cli("--endpoint", self.proc.address, "--json", "stat")
            assert cli.returncode == 0, cli.stderr
            assert json.loads(cli.stdout)["corrupt_blocks"] == len(victims)
            assert client.exists(victims) == [False] * len(victims)
            assert client.exists([k for k in keys if k not in victims]) == [True] * (len(keys) - len(victims))
            listed = {k for k, _ in client.list()}
            assert listed == set(keys) - set(victims)
            stat = client.stat()
            assert stat["blocks"] == len(keys) - len(victims)
            assert stat["bytes"] == sum(len(v) for k, v in self.values.items() if k not in victims)
            # The daemon keeps serving: the victims' keys can be written again.
            fresh = {key: b"rewritten " + key for key in victims}
            assert client.put_many(list(fresh.items())) == len(fresh)
            assert client.get_many(victims) == [fresh[k] for k in victims]
            assert client.stat()["blocks"] == len(keys)
        assert "Traceback" not in "".join(self.proc.log), "".join(self.proc.log)


def test_flipped_value_byte_is_a_counted_miss(daemon_process, tmp_path):
    sizes = {f"block-{i:02d}".encode(): size for i, size in enumerate([100, 4096, 65536, 1 << 20, 3 << 20] * 3)}
    s = Scenario(daemon_process, tmp_path, sizes)
    s.proc.start()
    s.write()
    s.stop()

    victims = [b"block-01", b"block-03", b"block-09"]  # 4 KiB, 1 MiB, 3 MiB
    for key in victims:
        path, at = locate(s.data_dir, s.values[key])
        flip(path, at + len(s.values[key]) // 2)

    s.proc.start()
    s.check_after_damage(victims)
    # What was dropped stays dropped across a restart.
    s.stop()
    s.proc.start()
    with s.client() as client:
        assert client.get_many(victims) == [b"rewritten " + k for k in victims]
        assert client.stat()["blocks"] == len(sizes)
        others = [k for k in sizes if k not in victims]
        assert client.get_many(others) == [s.values[k] for k in others]


def test_flipped_first_and_last_value_bytes(daemon_process, tmp_path):
    sizes = {f"edge-{i}".encode(): 8192 for i in range(4)}
    s = Scenario(daemon_process, tmp_path, sizes, seed=2)
    s.proc.start()
    s.write()
    s.stop()
    first, last = b"edge-1", b"edge-2"
    path, at = locate(s.data_dir, s.values[first])
    flip(path, at)
    path, at = locate(s.data_dir, s.values[last])
    flip(path, at + len(s.values[last]) - 1)
    s.proc.start()
    s.check_after_damage([first, last])


@pytest.mark.parametrize("field", sorted(HEADER_FIELDS))
def test_flipped_record_header_is_a_miss(daemon_process, tmp_path, field):
    sizes = {f"hdr-{i}".encode(): 32768 for i in range(6)}
    s = Scenario(daemon_process, tmp_path, sizes, seed=3)
    s.proc.start()
    s.write()
    s.stop()
    victim = b"hdr-2"
    path, start = s.header_offset(victim)
    flip(path, start + HEADER_FIELDS[field])
    s.proc.start()
    s.check_after_damage([victim])


def test_flipped_record_key_is_a_miss(daemon_process, tmp_path):
    """The storage key stored before the value is covered by the header's crc32."""
    sizes = {f"rkey-{i}".encode(): 32768 for i in range(4)}
    s = Scenario(daemon_process, tmp_path, sizes, seed=4)
    s.proc.start()
    s.write()
    s.stop()
    victim = b"rkey-1"
    path, start = s.header_offset(victim)
    flip(path, start + HEADER_SIZE + len(s.storage_key(victim)) - 1)
    s.proc.start()
    s.check_after_damage([victim])


@pytest.mark.parametrize("cut", ["mid_value", "last_byte", "inside_header"])
def test_truncated_segment_is_a_miss(daemon_process, tmp_path, cut):
    sizes = {f"trunc-{i}".encode(): 50_000 + i for i in range(6)}
    s = Scenario(daemon_process, tmp_path, sizes, seed=5)
    s.proc.start()
    s.write()
    # The victim is written last, so it is the tail record of the newest segment.
    victim = b"trunc-victim"
    s.values[victim] = recognizable(random.Random(9), victim, 300_000)
    s.write({victim: s.values[victim]})
    s.stop()

    path, at = locate(s.data_dir, s.values[victim])
    assert path == segment_files(s.data_dir)[-1]
    assert path.stat().st_size == at + len(s.values[victim]), "the victim is not the segment's last record"
    new_size = {
        "mid_value": at + len(s.values[victim]) // 2,
        "last_byte": at + len(s.values[victim]) - 1,
        "inside_header": s.header_offset(victim)[1] + HEADER_SIZE // 2,
    }[cut]
    os.truncate(path, new_size)

    s.proc.start()
    s.check_after_damage([victim])


def test_missing_segment_file_is_a_miss(daemon_process, tmp_path):
    sizes = {f"gone-{i}".encode(): 10_000 for i in range(3)}
    s = Scenario(daemon_process, tmp_path, sizes, seed=6)
    s.proc.start()
    s.write()
    s.stop()
    s.proc.start()  # a new process writes to a new segment
    victim = b"gone-victim"
    s.values[victim] = recognizable(random.Random(7), victim, 20_000)
    s.write({victim: s.values[victim]})
    s.stop()
    path, _ = locate(s.data_dir, s.values[victim])
    assert len(segment_files(s.data_dir)) == 2
    path.unlink()
    s.proc.start()
    s.check_after_damage([victim])
