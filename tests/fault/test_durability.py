"""Durability of acknowledged puts across kill -9, SIGTERM drains and restarts.

Every test runs ``kvstore-server`` as a subprocess (``daemon_process``) and
restarts it on the same data directory and port. A key is recorded as
acknowledged only after its put returned; whatever was acknowledged must come
back byte for byte, and puts that were in flight may be present or absent but
never wrong.
"""

from __future__ import annotations

import hashlib
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

from kvstore.client import SyncClient
from kvstore.errors import KVStoreError, UnavailableError

MiB = 1 << 20


def digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=32).digest()


def random_size(rng: random.Random) -> int:
    """1 byte to 4 MiB, mostly small: the sizes a KV cache and its metadata produce."""
    r = rng.random()
    if r < 0.08:
        return 1
    if r < 0.55:
        return rng.randint(2, 64 << 10)
    if r < 0.90:
        return rng.randint(64 << 10, 1 * MiB)
    return rng.randint(1 * MiB, 4 * MiB)


def make_value(rng: random.Random, key: bytes, size: int) -> bytes:
    """Random bytes that start with the key (when they have room), so no two values are alike."""
    tag = key[:size]
    return tag + rng.randbytes(size - len(tag))


@dataclass(repr=False)
class Ledger:
    """What the test sent: every attempted key's expected value (as a digest and a
    length) and which keys were acknowledged. Values are kept as digests so the
    long form does not hold gigabytes."""

    expected: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)
    acked: set[bytes] = field(default_factory=set)
    seen: set[bytes] = field(default_factory=set)  # unacknowledged keys a restarted daemon served
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attempt(self, items) -> None:
        with self.lock:
            for key, value in items:
                assert key not in self.expected, "keys are unique per test"
                self.expected[key] = (len(value), digest(value))

    def ack(self, items) -> None:
        with self.lock:
            self.acked.update(key for key, _ in items)


def verify(address: str, tenant: str, ledger: Ledger, *, chunk: int = 64) -> int:
    """Every acknowledged key present and exact; in-flight keys absent or exact;
    stat counts exactly what is present. Returns how many keys are present."""
    keys = sorted(ledger.expected)
    present_blocks = 0
    present_bytes = 0
    with SyncClient(address, tenant=tenant) as client:
        for start in range(0, len(keys), chunk):
            part = keys[start : start + chunk]
            values = client.get_many(part)
            assert len(values) == len(part)
            for key, value in zip(part, values):
                length, want = ledger.expected[key]
                if value is None:
                    if key in ledger.acked:
                        pytest.fail(f"acknowledged block {key!r} ({length} bytes) lost")
                    if key in ledger.seen:
                        pytest.fail(f"block {key!r} was served after an earlier restart, then lost")
                    continue
                assert len(value) == length, f"{key!r}: {len(value)} bytes back, {length} were put"
                assert digest(value) == want, f"{key!r}: the bytes differ from what was put"
                if key not in ledger.acked:
                    ledger.seen.add(key)
                present_blocks += 1
                present_bytes += length
        exists = client.exists(keys)
        stat = client.stat()
    lost = [key for key, hit in zip(keys, exists) if key in ledger.acked and not hit]
    assert not lost, f"exists says acknowledged blocks are missing: {lost[:5]!r}"
    assert sum(exists) == present_blocks
    assert stat["blocks"] == present_blocks, stat
    assert stat["bytes"] == present_bytes, stat
    return present_blocks


class Writers:
    """Threads that put random blocks as fast as they can, each with its own
    SyncClient, until told to stop or until a put fails."""

    def __init__(self, address: str, tenant: str, ledger: Ledger, tag: str, *, n: int, seed: int,
                 durabilities=(None, "disk", "disk", "sync"), max_batch: int = 4, size=random_size) -> None:
        self.address = address
        self.tenant = tenant
        self.ledger = ledger
        self.tag = tag
        self.seed = seed
        self.durabilities = durabilities
        self.max_batch = max_batch
        self.size = size
        self.stop = threading.Event()
        self.acks = 0
        self.failures: list[BaseException] = []
        self.unexpected: list[BaseException] = []
        self._count = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def start(self) -> "Writers":
        for t in self.threads:
            t.start()
        return self

    def _run(self, wid: int) -> None:
        rng = random.Random(f"{self.seed}-{wid}")
        try:
            client = SyncClient(self.address, tenant=self.tenant)
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.unexpected.append(exc)
            return
        try:
            i = 0
            while not self.stop.is_set():
                batch = 1 if rng.random() < 0.75 else rng.randint(2, self.max_batch)
                items = []
                for _ in range(batch):
                    key = f"{self.tag}/w{wid}/{i:06d}".encode()
                    i += 1
                    items.append((key, make_value(rng, key, self.size(rng))))
                durability = rng.choice(self.durabilities)
                self.ledger.attempt(items)
                try:
                    if batch == 1:
                        client.put(items[0][0], items[0][1], durability=durability)
                    else:
                        stored = client.put_many(items, durability=durability)
                        assert stored == batch
                except KVStoreError as exc:
                    self.failures.append(exc)
                    return
                self.ledger.ack(items)
                with self._count:
                    self.acks += 1
        except BaseException as exc:
            self.unexpected.append(exc)
        finally:
            try:
                client.close()
            except BaseException:
                pass

    def wait_for_acks(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.acks < n:
            assert not self.unexpected, self.unexpected
            assert time.monotonic() < deadline, f"only {self.acks} puts acknowledged in {timeout}s"
            alive = [t for t in self.threads if t.is_alive()]
            assert alive, f"every writer stopped: {self.failures!r}"
            time.sleep(0.002)

    def join(self, timeout: float = 60) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "a writer hung after the daemon went away"
        assert not self.unexpected, self.unexpected


def kill9_cycles(daemon_process, cycles: int, acks_per_cycle: int) -> None:
    tenant = "dur-" + uuid.uuid4().hex[:10]
    ledger = Ledger()
    proc = daemon_process("--memory", "64MiB").start()
    port = proc.port
    for cycle in range(cycles):
        writers = Writers(proc.address, tenant, ledger, f"c{cycle}", n=4, seed=cycle).start()
        writers.wait_for_acks(acks_per_cycle)
        proc.kill9()  # while the writers keep putting
        assert proc.proc.returncode == -9
        writers.join()
        # The writers only stop when a put fails, so puts were in flight at the kill.
        assert writers.failures, "no put was in flight when the daemon was killed"
        wrong = [e for e in writers.failures if not isinstance(e, UnavailableError)]
        assert not wrong, f"a put to a killed daemon should fail as UNAVAILABLE: {wrong!r}"
        proc.start()
        assert proc.port == port, "the restarted daemon must reuse the port"
        present = verify(proc.address, tenant, ledger)
        assert present >= len(ledger.acked)
    assert len(ledger.acked) >= cycles * acks_per_cycle


def test_kill9_loses_no_acknowledged_put(daemon_process):
    kill9_cycles(daemon_process, cycles=3, acks_per_cycle=25)


@pytest.mark.slow
def test_kill9_loses_no_acknowledged_put_soak(daemon_process):
    kill9_cycles(daemon_process, cycles=20, acks_per_cycle=40)


def test_sigterm_drains_in_flight_puts(daemon_process):
    """SIGTERM while puts are in flight: exit code 0, and every put that was
    acknowledged (before, or during the drain) is there after a restart."""
    tenant = "drain-" + uuid.uuid4().hex[:10]
    ledger = Ledger()
    proc = daemon_process("--memory", "64MiB").start()
    writers = Writers(
        proc.address, tenant, ledger, "drain", n=6, seed=7,
        durabilities=("memory", "disk", "sync", None),
        size=lambda rng: rng.randint(1, 1 * MiB),
    ).start()
    writers.wait_for_acks(40)
    acks_before = writers.acks
    assert proc.terminate(timeout=30) == 0, "".join(proc.log)
    writers.join()
    assert writers.failures, "the writers should have been refused once the daemon stopped"
    # Six writers always have puts in flight: the drain lets them finish rather than dropping them.
    assert writers.acks > acks_before, "no put in flight at SIGTERM was completed by the drain"
    refused = [e for e in writers.failures if not isinstance(e, UnavailableError)]
    assert not refused, f"a draining or stopped daemon should answer UNAVAILABLE: {refused!r}"
    log = "".join(proc.log)
    assert "draining" in log and "stopped" in log, log
    assert "Traceback" not in log, log

    proc.start()
    verify(proc.address, tenant, ledger)
    assert proc.terminate() == 0


def test_memory_durability_written_back_on_sigterm(daemon_process):
    """Blocks acknowledged at durability "memory" exist only in the arena until
    written back; a SIGTERM drain must write them to disk."""
    tenant = "mem-" + uuid.uuid4().hex[:10]
    rng = random.Random(11)
    proc = daemon_process("--memory", "128MiB").start()
    items = []
    for i in range(300):
        key = f"mem/{i:04d}".encode()
        size = rng.choice([1, rng.randint(2, 4096), rng.randint(4096, 256 << 10), rng.randint(256 << 10, 2 * MiB)])
        items.append((key, make_value(rng, key, size)))
    with SyncClient(proc.address, tenant=tenant) as client:
        for start in range(0, len(items), 30):
            assert client.put_many(items[start : start + 30], durability="memory") == 30
        assert client.stat()["blocks"] == len(items)
    assert proc.terminate() == 0, "".join(proc.log)

    proc.start()
    with SyncClient(proc.address, tenant=tenant) as client:
        stats = client.server_stats()
        # Nothing is resident in memory after a restart: the disk tier holds them all.
        assert stats["tiers"]["memory"]["blocks"] == 0
        assert stats["tiers"]["disk"]["blocks"] == len(items)
        assert stats["tiers"]["disk"]["bytes"] == sum(len(v) for _, v in items)
        got = client.get_many([k for k, _ in items])
        for (key, value), back in zip(items, got):
            assert back is not None, f"memory-durability block {key!r} lost on SIGTERM"
            assert back == value, key
        stat = client.stat()
        assert stat["blocks"] == len(items)
        assert stat["bytes"] == sum(len(v) for _, v in items)
        assert sorted(k for k, _ in client.list()) == sorted(k for k, _ in items)


def test_restart_serves_without_scanning(daemon_process):
    """With many blocks persisted a restart opens the index and serves at once."""
    tenant = "restart-" + uuid.uuid4().hex[:10]
    rng = random.Random(5)
    n = 20_000
    values = {f"blk/{i:06d}".encode(): rng.randbytes(rng.randint(1, 512)) for i in range(n)}
    proc = daemon_process("--memory", "32MiB").start()
    with SyncClient(proc.address, tenant=tenant) as client:
        assert client.put_many(list(values.items())) == n
    assert proc.terminate() == 0

    began = time.monotonic()
    proc.start(timeout=30)
    with SyncClient(proc.address, tenant=tenant) as client:
        key = rng.choice(list(values))
        assert client.get(key) == values[key]
        elapsed = time.monotonic() - began
        stat = client.stat()
        assert stat["blocks"] == n
        assert stat["bytes"] == sum(map(len, values.values()))
        sample = rng.sample(list(values), 200)
        assert client.get_many(sample) == [values[k] for k in sample]
    # Loose: a scan of the data would also pass this on a fast disk, but a
    # daemon that rereads every segment before serving would not come close.
    assert elapsed < 10, f"restart took {elapsed:.1f}s before serving a key"


def test_start_log_line_names_address_data_dir_and_memory(daemon_process, tmp_path):
    data_dir = tmp_path / "logged"
    proc = daemon_process("--memory", "96MiB", data_dir=data_dir).start()
    lines = [line for line in proc.log if "listening on" in line]
    assert len(lines) == 1, proc.log
    line = lines[0]
    assert proc.address in line
    assert re.search(rf"listening on {re.escape(proc.address)}\b", line), line
    assert str(data_dir.resolve()) in line, line
    assert re.search(r"memory=96(\.0)? ?MiB\b", line), line
    assert proc.terminate() == 0


def test_a_second_sigterm_after_the_drain_still_exits_0(tmp_path):
    """Kubernetes or a shell may signal twice; a daemon that already drained must still exit cleanly."""
    codes = []
    for i in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore.server", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / f"d{i}")],
            stderr=subprocess.PIPE, text=True,
        )
        try:
            for line in proc.stderr:
                if "listening on" in line:
                    break
            proc.send_signal(signal.SIGTERM)
            for line in proc.stderr:
                if "stopped" in line:
                    break
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            codes.append(proc.wait(30))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert codes == [0, 0, 0]
