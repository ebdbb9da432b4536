"""The disk tier: values in segment files, RocksDB (through rocksdict) as the index.

Column families:
    default  storage key -> IndexRecord (where the value is, its length,
             checksum and sequence); one contiguous key range per namespace
    ns       namespace prefix -> NamespaceRecord (block and byte counters,
             creation time; later quotas and settings)

Opening the index is all a restart needs: nothing is scanned before requests
are served. Every method is blocking and thread-safe; the BlockStore calls
them from I/O threads, never from the event loop.

Durability: "disk" appends the value and writes the index entry through
RocksDB's WAL (both reach the OS before the put is acknowledged, so a killed
process loses nothing); "sync" additionally fdatasyncs the segments and the
WAL, group-committed: one fsync pair serves every sync put that arrived within
``sync_window``.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import rocksdict

from kvstore.checksum import checksum as xxh3
from kvstore.errors import ConfigError, InternalError, ResourceExhaustedError
from kvstore.namespace import Namespace, range_end
from kvstore.protocol.codes import ErrorCode
from kvstore.server.storage.segments import SegmentLog

log = logging.getLogger("kvstore.server.disk")

_RECORD = struct.Struct("<IQQQQ")  # segment id, value offset, length, checksum, sequence
_RECORD_CRC = struct.Struct("<I")
INDEX_DIR = "index"
SEGMENT_DIR = "segments"


@dataclass(frozen=True, slots=True)
class IndexRecord:
    segment: int
    offset: int
    length: int
    checksum: int
    seq: int

    def encode(self) -> bytes:
        body = _RECORD.pack(self.segment, self.offset, self.length, self.checksum, self.seq)
        return body + _RECORD_CRC.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, raw: bytes) -> "IndexRecord | None":
        """The record, or None when the stored bytes are damaged."""
        if len(raw) != _RECORD.size + _RECORD_CRC.size:
            return None
        body = raw[: _RECORD.size]
        if _RECORD_CRC.unpack_from(raw, _RECORD.size)[0] != zlib.crc32(body):
            return None
        return cls(*_RECORD.unpack(body))


@dataclass(slots=True)
class NamespaceCounters:
    blocks: int = 0
    bytes: int = 0
    created: float = 0.0

    def encode(self) -> bytes:
        return json.dumps({"blocks": self.blocks, "bytes": self.bytes, "created": self.created}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "NamespaceCounters":
        data = json.loads(raw)
        return cls(int(data.get("blocks", 0)), int(data.get("bytes", 0)), float(data.get("created", 0.0)))


@dataclass(slots=True)
class PendingWrite:
    """A value already appended to a segment, waiting for its index entry."""

    key: bytes
    record: IndexRecord


class DiskTier:
    def __init__(self, data_dir: Path, *, segment_size: int, sync_window: float = 0.0005) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.segments = SegmentLog(self.data_dir / SEGMENT_DIR, segment_size)
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        options.set_paranoid_checks(True)
        ns_options = rocksdict.Options(raw_mode=True)
        try:
            self._db = rocksdict.Rdict(
                str(self.data_dir / INDEX_DIR), options, column_families={"ns": ns_options}
            )
        except Exception as exc:  # rocksdict raises plain exceptions carrying RocksDB's status
            if "lock" in str(exc).lower():
                raise ConfigError(f"data_dir: {self.data_dir} is in use by another kvstore-server") from None
            raise InternalError(f"cannot open the index in {self.data_dir}: {exc}", code=ErrorCode.STORAGE_FAILURE) from exc
        self._ns_cf = self._db.get_column_family_handle("ns")
        self._ns_view = self._db.get_column_family("ns")
        self._async_write = rocksdict.WriteOptions()
        self._sync_write = rocksdict.WriteOptions()
        self._sync_write.sync = True
        self._lock = threading.Lock()  # serialises index read-modify-write
        self.namespaces: dict[bytes, NamespaceCounters] = {
            bytes(k): NamespaceCounters.decode(v) for k, v in self._ns_view.items()
        }
        self.corrupt_blocks = 0
        self._committer = _GroupCommitter(self, sync_window)

    # -- writes ------------------------------------------------------------

    def append(self, key: bytes, value, length: int, checksum: int, seq: int) -> PendingWrite:
        try:
            segment, offset = self.segments.append(key, value, length, checksum, seq)
        except OSError as exc:
            raise _storage_error("writing a segment", exc) from exc
        return PendingWrite(key, IndexRecord(segment, offset, length, checksum, seq))

    def commit(self, writes: list[PendingWrite], *, sync: bool) -> None:
        """Point the index at appended values; returns once durable as asked."""
        if not writes:
            return
        if sync:
            self._committer.submit(writes).result()
        else:
            self._apply(writes, sync=False)

    def write(self, items, *, sync: bool) -> None:
        """Append and commit (key, value, length, checksum, seq) tuples."""
        self.commit([self.append(*item) for item in items], sync=sync)

    def _apply(self, writes: list[PendingWrite], *, sync: bool) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        with self._lock:
            staged: dict[bytes, IndexRecord | None] = {}
            touched: set[bytes] = set()
            for write in writes:
                old = staged[write.key] if write.key in staged else self._record(write.key)
                if old is not None and old.seq > write.record.seq:
                    continue  # a newer write of this key already landed
                batch.put(write.key, write.record.encode())
                staged[write.key] = write.record
                prefix = _ns_prefix(write.key)
                counters = self._counters(prefix)
                if old is not None:
                    counters.blocks -= 1
                    counters.bytes -= old.length
                counters.blocks += 1
                counters.bytes += write.record.length
                touched.add(prefix)
            self._write_counters(batch, touched)
            self._write(batch, sync)

    # -- reads -------------------------------------------------------------

    def _record(self, key: bytes) -> IndexRecord | None:
        raw = self._db.get(key)
        if raw is None:
            return None
        record = IndexRecord.decode(raw)
        if record is None:
            self._count_corrupt(key, "damaged index entry")
            self._db.delete(key)
        return record

    def lookup(self, key: bytes) -> IndexRecord | None:
        return self._record(key)

    def contains(self, keys: list[bytes]) -> list[bool]:
        if not keys:
            return []
        return [raw is not None for raw in self._db.get(keys)]

    def read(self, key: bytes) -> tuple[bytes, IndexRecord] | None:
        """The value and its record, or None on a miss or a block that failed its checksum."""
        record = self._record(key)
        if record is None:
            return None
        try:
            found = self.segments.read_record(record.segment, record.offset, key, record.length)
        except FileNotFoundError:
            found = None
        except OSError as exc:
            raise _storage_error("reading a segment", exc) from exc
        if found is None or found[:2] != (record.checksum, record.seq) or xxh3(found[2]) != record.checksum:
            self._count_corrupt(key, f"damaged record in segment {record.segment}")
            self._forget(key, record)
            return None
        return found[2], record

    def scan(self, prefix: bytes, start_after: bytes, limit: int) -> tuple[list[tuple[bytes, int]], bool]:
        """Up to ``limit`` (storage key, length) pairs after ``start_after`` within ``prefix``."""
        begin = max(prefix, start_after + b"\x00") if start_after else prefix
        upper = range_end(prefix)
        out: list[tuple[bytes, int]] = []
        it = self._db.iter()
        it.seek(begin)
        while it.valid():
            key = bytes(it.key())
            if key >= upper:
                return out, False
            if len(out) == limit:
                return out, True
            record = IndexRecord.decode(bytes(it.value()))
            if record is not None:
                out.append((key, record.length))
            it.next()
        return out, False

    # -- deletes -----------------------------------------------------------

    def delete(self, keys: list[bytes]) -> int:
        batch = rocksdict.WriteBatch(raw_mode=True)
        deleted = 0
        with self._lock:
            touched: set[bytes] = set()
            seen: set[bytes] = set()
            for key in keys:
                if key in seen:
                    continue
                seen.add(key)
                old = self._record(key)
                if old is None:
                    continue
                batch.delete(key)
                counters = self._counters(_ns_prefix(key))
                counters.blocks -= 1
                counters.bytes -= old.length
                touched.add(_ns_prefix(key))
                deleted += 1
            self._write_counters(batch, touched)
            self._write(batch, False)
        return deleted

    def _forget(self, key: bytes, record: IndexRecord) -> None:
        """Drop a damaged block's index entry if it still points at ``record``."""
        with self._lock:
            if self._db.get(key) is None:
                return
            current = IndexRecord.decode(self._db.get(key))
            if current is not None and current != record:
                return
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.delete(key)
            counters = self._counters(_ns_prefix(key))
            counters.blocks -= 1
            counters.bytes -= record.length
            self._write_counters(batch, {_ns_prefix(key)})
            self._write(batch, False)

    def drop_namespace(self, ns: Namespace) -> NamespaceCounters:
        """Remove every block of a namespace with one range deletion."""
        prefix = ns.prefix
        with self._lock:
            counters = self.namespaces.pop(prefix, NamespaceCounters())
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.delete_range(prefix, range_end(prefix))
            batch.delete(prefix, self._ns_cf)
            self._write(batch, False)
        return counters

    # -- namespaces --------------------------------------------------------

    def namespace_stats(self) -> list[tuple[Namespace, NamespaceCounters]]:
        with self._lock:
            items = list(self.namespaces.items())
        return sorted(((Namespace.from_prefix(p)[0], c) for p, c in items), key=lambda x: str(x[0]))

    def counters_with(self, prefix: bytes, dirty: list) -> NamespaceCounters:
        """A namespace's counters as of one moment, including blocks that are only in
        memory (``dirty`` entries with key, length and seq) or newer there than on disk."""
        with self._lock:
            counters = self.namespaces.get(prefix) or NamespaceCounters()
            blocks, nbytes = counters.blocks, counters.bytes
            for entry in dirty:
                on_disk = self._record(entry.key)
                if on_disk is None:
                    blocks, nbytes = blocks + 1, nbytes + entry.length
                elif on_disk.seq < entry.seq:
                    nbytes += entry.length - on_disk.length
                # else: already written back, and counted
        return NamespaceCounters(blocks, nbytes, counters.created)

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return (sum(c.blocks for c in self.namespaces.values()), sum(c.bytes for c in self.namespaces.values()))

    # -- plumbing ----------------------------------------------------------

    def _counters(self, prefix: bytes) -> NamespaceCounters:
        counters = self.namespaces.get(prefix)
        if counters is None:
            counters = self.namespaces[prefix] = NamespaceCounters(created=time.time())
        return counters

    def _write_counters(self, batch, prefixes: set[bytes]) -> None:
        for prefix in prefixes:
            batch.put(prefix, self.namespaces[prefix].encode(), self._ns_cf)

    def _write(self, batch, sync: bool) -> None:
        try:
            self._db.write(batch, self._sync_write if sync else self._async_write)
        except Exception as exc:  # rocksdict raises plain exceptions carrying RocksDB's status text
            raise _storage_error("writing the index", exc) from exc

    def _count_corrupt(self, key: bytes, why: str) -> None:
        self.corrupt_blocks += 1
        try:
            ns, user_key = Namespace.from_prefix(key)
            where = f"{ns} key {user_key[:32]!r}"
        except Exception:
            where = f"storage key {key[:32]!r}"
        log.warning("corrupt block dropped (%s): %s", why, where)

    def flush(self) -> None:
        self.segments.sync()
        self._db.flush_wal(True)

    def close(self) -> None:
        self._committer.close()
        try:
            self.flush()
        finally:
            # Column-family views hold the database open; drop them so the LOCK is released.
            del self._ns_view, self._ns_cf
            self._db.close()
            del self._db
            self.segments.close()


def _ns_prefix(key: bytes) -> bytes:
    tlen = key[0]
    slen = key[1 + tlen]
    return key[: 2 + tlen + slen]


def _storage_error(what: str, exc: BaseException):
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno == 28 or "No space" in text:
        return ResourceExhaustedError(f"disk full while {what}: {text}", code=ErrorCode.CAPACITY_EXHAUSTED)
    return InternalError(f"storage failure while {what}: {text}", code=ErrorCode.STORAGE_FAILURE)


class _GroupCommitter:
    """One thread that turns many concurrent sync commits into one fsync pair."""

    def __init__(self, disk: DiskTier, window: float) -> None:
        self._disk = disk
        self._window = window
        self._cond = threading.Condition()
        self._queue: list[tuple[list[PendingWrite], Future]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvstore-group-commit", daemon=True)
        self._thread.start()

    def submit(self, writes: list[PendingWrite]) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise InternalError("the disk tier is closed", code=ErrorCode.SHUTTING_DOWN)
            self._queue.append((writes, future))
            self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue and self._closed:
                    return
            if self._window:
                time.sleep(self._window)  # let concurrent sync puts join this commit
            with self._cond:
                group, self._queue = self._queue, []
            try:
                self._disk.segments.sync()
                self._disk._apply([w for writes, _ in group for w in writes], sync=True)
            except BaseException as exc:  # every waiter learns of the failure
                for _, future in group:
                    future.set_exception(exc)
            else:
                for _, future in group:
                    future.set_result(None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
