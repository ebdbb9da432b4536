"""Helpers shared by the fault tests."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
import urllib.request
from pathlib import Path

from kvstore._proto.v1 import data_pb2
from kvstore.client import SyncClient
from kvstore.client.connection import Connection
from kvstore.ring import Ring


def emptied_stats(kv: SyncClient, address: str, timeout: float = 10) -> dict:
    """Drop every namespace the daemon at ``address`` knows, until its arena holds no
    bytes or ``timeout`` passes (transfers of dead clients may still be releasing
    extents); the daemon's stats after the last try."""
    deadline = time.monotonic() + timeout
    while True:
        for ns in kv.namespaces():
            with SyncClient(address, tenant=ns["tenant"], subtenant=ns["subtenant"]) as owner:
                owner.drop_namespace()
        stats = kv.server_stats()
        if stats["arena_used_bytes"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def metric(port: int, name: str) -> float:
    """The value of the unlabelled metric ``name`` on the /metrics endpoint at ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)}(?:\{{\}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is not on the metrics endpoint:\n{text[:2000]}"
    return float(match.group(1))


# -- segment files (corruption tests) --------------------------------------


def segment_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / "segments").glob("*.seg"))
    assert files, f"no segment files under {data_dir / 'segments'}"
    return files


def locate(data_dir: Path, value: bytes) -> tuple[Path, int]:
    """The segment file and offset holding ``value`` (which must occur exactly once)."""
    hits = []
    for path in segment_files(data_dir):
        data = path.read_bytes()
        at = data.find(value)
        while at >= 0:
            hits.append((path, at))
            at = data.find(value, at + 1)
    assert len(hits) == 1, f"value found {len(hits)} times in the segments"
    return hits[0]


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        assert len(byte) == 1
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- clusters: placement, readers and writers under faults -----------------


def node_keys(address: str, tenant: str) -> set[bytes]:
    """The keys one daemon holds in (tenant, default), asked of that daemon alone."""

    async def scan() -> set[bytes]:
        conn = Connection(address)
        keys: set[bytes] = set()
        after = b""
        try:
            while True:
                request = data_pb2.ListRequest(
                    namespace=data_pb2.Namespace(tenant=tenant, subtenant="default"), start_after=after, limit=1000
                )
                response = await conn.data.List(request, timeout=10)
                keys.update(e.key for e in response.entries)
                if not response.truncated or not response.entries:
                    return keys
                after = response.entries[-1].key
        finally:
            await conn.close()

    return asyncio.run(scan())


def holders(cluster, tenant: str, key: bytes) -> list[str]:
    """Which daemons of ``cluster`` hold ``key`` right now, asked one by one (for failure
    messages; "node?" for one that did not answer)."""
    found = []
    for node in cluster.ids:
        try:
            if key in node_keys(f"127.0.0.1:{cluster.ports[node]}", tenant):
                found.append(node)
        except Exception:
            found.append(f"{node}?")
    return found


def expected_placement(ids: list[str], tenant: str, keys, replicas: int) -> dict[str, set[bytes]]:
    ring = Ring(ids)
    placement: dict[str, set[bytes]] = {node: set() for node in ids}
    for key in keys:
        for node in ring.owners(tenant, "default", key, replicas):
            placement[node].add(key)
    return placement


def wait_for_placement(cluster, tenant: str, keys, replicas: int, timeout: float = 90.0) -> None:
    want = expected_placement(cluster.ids, tenant, keys, replicas)
    deadline = time.monotonic() + timeout
    while True:
        dead = [n for n in cluster.ids if cluster[n].proc.poll() is not None]
        assert not dead, "".join(f"{n} exited:\n" + "".join(cluster[n].log[-30:]) for n in dead)
        try:
            have = {node: node_keys(f"127.0.0.1:{cluster.ports[node]}", tenant) for node in cluster.ids}
        except Exception as exc:  # a daemon that died shows up in the check above on the next round
            have = {"unreachable": str(exc)}
        if have == want:
            return
        if time.monotonic() > deadline:
            diff = {n: (len(have[n] - want[n]), len(want[n] - have[n])) for n in cluster.ids} if "unreachable" not in have else have
            raise AssertionError(f"placement did not converge: (extra, missing) per node {diff}")
        time.sleep(0.5)


class Readers:
    """A thread reading acknowledged blocks back the whole time, byte-exact."""

    def __init__(self, cluster, tenant: str, values: dict[bytes, bytes]) -> None:
        self.cluster, self.tenant, self.values = cluster, tenant, values
        self.failures: list[str] = []
        self.reads = 0
        self.phase = "start"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(3)
        kv = SyncClient(self.cluster.endpoints, tenant=self.tenant, read_failures="raise", attempt_timeout=2.0)
        try:
            keys = list(self.values)
            while not self.stop.is_set():
                sample = rng.sample(keys, 32)
                try:
                    got = kv.get_many(sample)
                except Exception as exc:
                    self.failures.append(f"get raised {exc!r}")
                    time.sleep(0.2)
                    continue
                self.reads += len(sample)
                for k, v in zip(sample, got):
                    if v != self.values[k]:
                        self.failures.append(
                            f"{k!r}: {'missing' if v is None else 'wrong bytes'} [{self.phase}; "
                            f"held by {holders(self.cluster, self.tenant, k)}; map {kv.cluster_map()}; "
                            f"order {kv._client._maps.view.read_order(self.tenant, 'default', k)}]"
                        )
        finally:
            kv.close()

    def __enter__(self) -> "Readers":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join(60)


def cluster_client(cluster, tenant: str, **settings) -> SyncClient:
    settings.setdefault("read_failures", "raise")  # a lost block must fail the test, not read as a miss
    settings.setdefault("attempt_timeout", 2.0)
    settings.setdefault("timeout", 30.0)
    return SyncClient(cluster.endpoints, tenant=tenant, **settings)


class Workload:
    """Writers that record what was acknowledged and read it back as they go."""

    def __init__(self, cluster, tenant: str, writers: int, seed: int) -> None:
        self.cluster = cluster
        self.tenant = tenant
        self.acked: dict[bytes, bytes] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.put_errors = 0
        self.reads = 0
        self.threads = [threading.Thread(target=self._run, args=(w, seed + w), daemon=True) for w in range(writers)]

    def _run(self, writer: int, seed: int) -> None:
        rng = random.Random(seed)
        kv = cluster_client(self.cluster, self.tenant)
        try:
            batch = 0
            while not self.stop.is_set():
                batch += 1
                items = {
                    f"w{writer}-b{batch}-{j}".encode(): rng.randbytes(rng.choice((512, 4096, 65536)))
                    for j in range(8)
                }
                try:
                    kv.put_many(items)
                except Exception as exc:  # not acknowledged: allowed, but counted
                    self.put_errors += 1
                    if self.put_errors < 5:
                        print(f"put failed (not acknowledged): {exc!r}")
                else:
                    with self.lock:
                        self.acked.update(items)
                with self.lock:
                    sample = rng.sample(list(self.acked), min(16, len(self.acked)))
                    expected = [self.acked[k] for k in sample]
                try:
                    got = kv.get_many(sample)
                except Exception as exc:
                    self.failures.append(f"get of acknowledged keys raised {exc!r}")
                    continue
                self.reads += len(sample)
                for key, want, have in zip(sample, expected, got):
                    if have != want:
                        self.failures.append(f"{key!r}: {'missing' if have is None else 'wrong bytes'} (held by {self.holders(key)})")
        finally:
            kv.close()

    def holders(self, key: bytes) -> list[str]:
        """Which daemons hold ``key`` right now, asked one by one (for failure messages)."""
        return holders(self.cluster, self.tenant, key)

    def __enter__(self) -> "Workload":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
