"""Markdown tables of the results, machine information, and the files they go to."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from bench.measure import Result

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.md"
DEFAULT_STORAGE_OUTPUT = Path(__file__).resolve().parent / "results" / "storage.md"

# -- numbers ---------------------------------------------------------------


def size_label(n: int) -> str:
    """ "64 KiB", "1 MiB", "1.5 GiB": whole units where the size has them."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if n % scale == 0 else f"{value:.1f} {unit}"
    return f"{n} B"


def rate(x: float) -> str:
    """Three significant digits without an exponent."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def count(x: float) -> str:
    return f"{x:,.0f}"


def millis(x: float | None) -> str:
    return "–" if x is None else rate(x)


def share(part: float, whole: float | None) -> str:
    """``part`` as a percentage of ``whole``."""
    if not whole:
        return "–"
    pct = 100 * part / whole
    return f"{pct:.1f}%" if pct >= 1 else f"{pct:.2f}%"


def markdown_table(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Lines of a markdown table; ``align`` has one "l" or "r" per column."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (headers, rule, *rows)]


# -- the machine -------------------------------------------------------------


def machine_info() -> dict:
    """What a reader needs to compare two result files."""
    import kvstore

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": _memory_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "kvstore_version": kvstore.__version__,
        "git_commit": _git_commit(),
        "load_average": _load(),
    }
    for module in ("grpc", "numpy"):
        try:
            info[f"{module}_version"] = __import__(module).__version__
        except ImportError:
            info[f"{module}_version"] = None
    return info


def _load() -> list[float] | None:
    """1, 5 and 15-minute load averages: other work on the machine moves every number."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git_commit() -> str | None:
    """The checkout's commit, when the bench runs from one (read-only git call)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def filesystem_of(path: str | os.PathLike) -> str | None:
    """The type of the filesystem holding ``path`` ("ext4", "tmpfs"...), from /proc/mounts."""
    try:
        target = Path(path).resolve()
        best, kind = "", None
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            mount = fields[1].replace("\\040", " ")
            inside = target == Path(mount) or Path(mount) in target.parents
            if inside and len(mount) > len(best):
                best, kind = mount, fields[2]
        return kind
    except OSError:
        return None


def _where(directory: str, filesystem: str | None) -> str:
    return f"`{directory}`" + (f" ({filesystem})" if filesystem else "")


def _machine_lines(info: dict) -> list[str]:
    memory = f", {size_label(info['memory_bytes'])} RAM" if info.get("memory_bytes") else ""
    commit = f" (commit {info['git_commit']})" if info.get("git_commit") else ""
    load = ""
    if info.get("load_average"):
        load = f"; load average {' / '.join(map(str, info['load_average']))} (1/5/15 min) at the start"
        if info.get("load_average_end"):
            load += f", {' / '.join(map(str, info['load_average_end']))} at the end"
    return [
        f"- **date**: {info['date']}",
        f"- **machine**: {info['cpu_count']} CPUs ({info['cpu_model']}){memory}, {info['platform']}{load}",
        f"- **software**: Python {info['python']}, kvstore {info['kvstore_version']}{commit}, "
        f"grpcio {info.get('grpc_version')}, numpy {info.get('numpy_version')}",
    ]


# -- the SDK benchmark ---------------------------------------------------------

MEMCPY, TCP = "memcpy", "loopback TCP"
LIMIT_CASES = (MEMCPY, TCP)
LIMIT_OPS = {MEMCPY: "copy", TCP: "send"}
TARGET_SIZE = 1 << 20
# (kvstore system, reference system, at least this many times the reference's GB/s),
# checked for put and get at TARGET_SIZE, for every concurrency measured.
TARGETS = (
    ("kvstore zero-copy (shm)", MEMCPY, 0.7),
    ("kvstore zero-copy (shm)", "mooncake (shm)", 1.0),
    ("kvstore zero-copy (shm)", "redis", 5.0),
    ("kvstore zero-copy (engine memory)", "kvstore zero-copy (shm)", 0.8),
    ("kvstore zero-copy (tcp)", TCP, 0.5),
    ("kvstore zero-copy (tcp)", "mooncake (tcp)", 1.2),
    ("kvstore zero-copy (tcp)", "redis", 5.0),
)
# The machine's own ceiling of each kvstore system: a target that asks for more
# than the ceiling measured in the same run (5× Redis, when Redis already moves
# a third of what one loopback socket does) cannot be met by any store on that
# path; it is reported as such rather than as a miss.
CEILINGS = {"kvstore zero-copy (shm)": MEMCPY, "kvstore zero-copy (engine memory)": MEMCPY, "kvstore zero-copy (tcp)": TCP}


def ratio(x: float | None) -> str:
    """A multiple: "0.012×", "0.52×", "1.18×", "27×"."""
    if x is None:
        return "–"
    if x >= 10:
        return f"{x:.0f}×"
    if x >= 0.1:
        return f"{x:.2f}×"
    return f"{x:.3f}×"


def is_kvstore(system: str) -> bool:
    return system.startswith("kvstore")


class Index:
    """Results by (system, op, concurrency, block size), and the reference row of each."""

    def __init__(self, results: list[Result]) -> None:
        self.results = results
        self._by = {(r.system, r.op, r.concurrency, r.block_size): r for r in results}
        self.systems = list(dict.fromkeys(r.system for r in results))
        self.sizes = sorted({r.block_size for r in results})
        self.levels = sorted({r.concurrency for r in results})
        self.peers = [s for s in self.systems if s not in LIMIT_CASES and not is_kvstore(s)]

    def get(self, system: str, op: str, concurrency: int, size: int) -> Result | None:
        return self._by.get((system, op, concurrency, size))

    def reference(self, result: Result, system: str) -> Result | None:
        """The row of ``system`` that ``result`` is compared with: a limit's only row, or a
        peer's row of the same operation ("put (disk)" has no peer counterpart)."""
        if system in LIMIT_OPS:
            return self.get(system, LIMIT_OPS[system], result.concurrency, result.block_size)
        if result.op not in ("put", "get"):
            return None
        return self.get(system, result.op, result.concurrency, result.block_size)

    def times(self, result: Result, system: str) -> float | None:
        ref = self.reference(result, system)
        return result.gbps / ref.gbps if ref and ref.gbps else None

    def rows(self) -> list[tuple[str, str]]:
        """(system, op) in the order they ran."""
        return list(dict.fromkeys((r.system, r.op) for r in self.results))


def targets(index: Index) -> list[dict]:
    """The issue's targets at 1 MiB: one entry per (case, op, concurrency, reference)."""
    out = []
    if TARGET_SIZE not in index.sizes:
        return out
    for system, reference, factor in TARGETS:
        for conc in index.levels:
            for op in ("put", "get"):
                row = index.get(system, op, conc, TARGET_SIZE)
                if row is None:
                    continue
                ref = index.reference(row, reference)
                entry = {
                    "system": system, "op": op, "concurrency": conc, "reference": reference,
                    "target": factor, "gbps": row.gbps, "reference_gbps": ref.gbps if ref else None,
                    "ratio": row.gbps / ref.gbps if ref and ref.gbps else None,
                }
                entry["verdict"] = "n/a" if entry["ratio"] is None else ("PASS" if entry["ratio"] >= factor else "MISS")
                ceiling = index.reference(row, CEILINGS[system]) if system in CEILINGS else None
                if ref is not None and ceiling is not None and reference != CEILINGS[system]:
                    entry["ceiling"], entry["ceiling_gbps"] = CEILINGS[system], ceiling.gbps
                    if entry["verdict"] == "MISS" and factor * ref.gbps > ceiling.gbps:
                        entry["verdict"] = "ABOVE LIMIT"
                out.append(entry)
    return out


def render_sdk(info: dict, settings: dict, results: list[Result], notes: list[str]) -> str:
    index = Index(results)
    levels = index.levels
    lines = ["# kvstore benchmark: put/get GB/s and latency next to memcpy, loopback TCP and peer stores", ""]
    lines += _machine_lines(info)
    clients = " and ".join(str(c) for c in levels)
    lines += [
        f"- **daemon**: one `kvstore-server` on 127.0.0.1 for every kvstore case, `--ucx-tls {settings['daemon_ucx_tls']}`, "
        f"memory tier {size_label(settings['daemon_memory'])}, data dir "
        f"{_where(settings['data_dir'], settings.get('data_dir_filesystem'))}",
        f"- **clients**: {clients} client processes at once (each its own client and buffers, started together "
        f"at a barrier); {settings['batch']} blocks per call, one call in flight per client",
        f"- **volume**: about {size_label(settings['volume'])} per case over all its clients, at least "
        f"{settings['min_calls']} calls, every client at least one" + (" (quick run)" if settings.get("quick") else ""),
    ]
    for system, described in settings.get("kvstore_clients", {}).items():
        lines.append(f"- **{system}**: {described}")
    lines += ["", "## Throughput (GB/s)", ""]
    headers = ["system", "op"] + [f"{size_label(s)} ×{c}" for s in index.sizes for c in levels]
    rows = []
    for system, op in index.rows():
        row = [system, op]
        for size in index.sizes:
            for conc in levels:
                r = index.get(system, op, conc, size)
                row.append(rate(r.gbps) if r else "–")
        rows.append(row)
    lines += markdown_table(headers, rows, "ll" + "r" * (len(headers) - 2))
    lines.append("")
    lines.append("×N: N client processes at once; GB/s is their bytes together over the wall time from the "
                 "start barrier to the last one's finish.")

    lines += ["", f"## Targets ({size_label(TARGET_SIZE)} blocks, batches of {settings['batch']}, same run)", ""]
    checked = targets(index)
    if checked:
        groups: dict[tuple, dict[str, dict]] = {}
        for t in checked:
            groups.setdefault((t["system"], t["op"], t["concurrency"]), {})[t["reference"]] = t
        # Engine memory is held to the SDK's own allocate() path; the others to the machine's limits.
        columns = [("limit (or allocate())", (MEMCPY, TCP, "kvstore zero-copy (shm)")), ("Mooncake", ("mooncake (shm)", "mooncake (tcp)")), ("Redis", ("redis",))]

        def cell(t: dict | None) -> str:
            if t is None:
                return "–"
            goal = f"≥ {t['target']:g}× {t['reference']}"
            if t["ratio"] is None:
                return f"{goal}: not run"
            text = f"{goal}: {ratio(t['ratio'])} ({rate(t['gbps'])} vs {rate(t['reference_gbps'])} GB/s) **{t['verdict']}**"
            if t["verdict"] == "ABOVE LIMIT":
                text += (f" ({t['target']:g}× is {rate(t['target'] * t['reference_gbps'])} GB/s, more than "
                         f"{t['ceiling']} moves: {rate(t['ceiling_gbps'])} GB/s)")
            return text

        rows = []
        for (system, op, conc), by_ref in groups.items():
            row = [f"{system} {op}", f"×{conc}"]
            for _, refs in columns:
                row.append(cell(next((by_ref[r] for r in refs if r in by_ref), None)))
            rows.append(row)
        lines += markdown_table(["case", "clients", *[f"vs {name}" for name, _ in columns]], rows, "lllll")
        passed = sum(t["verdict"] == "PASS" for t in checked)
        missed = sum(t["verdict"] == "MISS" for t in checked)
        above = sum(t["verdict"] == "ABOVE LIMIT" for t in checked)
        unmeasured = len(checked) - passed - missed - above
        lines += ["", f"{passed} PASS, {missed} MISS"
                  + (f", {above} ABOVE LIMIT (the target exceeds what the machine itself moves on that path, "
                     "measured in this run)" if above else "")
                  + (f", {unmeasured} not measurable (reference not run)" if unmeasured else "") + "."]
    else:
        lines.append(f"Not checked: no {size_label(TARGET_SIZE)} zero-copy rows in this run.")

    lines += ["", "## Detail and ratios", ""]
    peers = index.peers
    headers = ["block", "clients", "system", "op", "GB/s", "ops/s", "p50 ms", "p99 ms", "calls", "moved",
               "vs memcpy", "vs TCP", *[f"vs {p}" for p in peers]]
    rows = []
    for size in index.sizes:
        for conc in levels:
            for r in results:
                if r.block_size != size or r.concurrency != conc:
                    continue
                row = [size_label(size), f"×{conc}", r.system, r.op, rate(r.gbps), count(r.ops_per_s),
                       millis(r.p50_ms), millis(r.p99_ms), str(r.calls), size_label(r.nbytes)]
                row.append("–" if r.system == MEMCPY else ratio(index.times(r, MEMCPY)))
                row.append("–" if r.system in LIMIT_CASES else ratio(index.times(r, TCP)))
                for peer in peers:
                    row.append(ratio(index.times(r, peer)) if is_kvstore(r.system) else "–")
                rows.append(row)
    lines += markdown_table(headers, rows, "llll" + "r" * (len(headers) - 4))

    lines += ["", "## Notes", ""]
    lines += [
        "- GB/s is 10^9 bytes per second; ops/s is blocks per second; p50/p99 are the latency of one call "
        f"(a batch of {settings['batch']} blocks), over every call of every client of the case.",
        "- vs X: the row's GB/s over X's at the same block size and client count (for a peer: the same "
        "operation; put (disk) is compared with the limits only).",
        "- kvstore put is durability \"memory\" (acknowledged once in the daemon's memory tier; written back "
        "to disk in the background, and the bench waits for that write-back, untimed, before the get case), "
        "as the peers keep blocks in memory only. put (disk) is acknowledged once the value is appended to a "
        "segment file and indexed (page cache, not fsynced): the cost of persistence.",
        "- zero-copy rows: `put_from`/`get_into`, buffers set up once per block size. (shm): memory the SDK "
        "allocated (`Client.allocate`, a memfd the co-located daemon maps): the daemon copies each block with "
        "one memcpy between it and its memory tier, hashing as it copies. (engine memory): numpy buffers the "
        "client allocated and registered (`Client.register`, as an engine's KV pool), to the same co-located "
        "daemon, which copies each block between the client's process and its memory tier itself "
        "(process_vm_readv/writev), hashing as it copies. (tcp): numpy buffers registered with "
        "`Client.register`; the daemon moves the bytes by RMA over UCX's TCP transport. "
        "inline rows: `put_many`/`get_many`, values inside the gRPC messages.",
        "- Every get case reads back the blocks its put case wrote; each value begins with its own key and "
        "every byte is compared with what was put (after the timed calls; destinations zeroed before).",
        "- memcpy: each call copies the batch block by block between two prefaulted buffers (the ceiling of a "
        "co-located store, which must copy each block once). loopback TCP: one 127.0.0.1 connection per client "
        "process, a sender thread streaming batches, `recv_into` a prefaulted buffer.",
        f"- Every row is the best of {settings['repeats']} run{'s' if settings['repeats'] != 1 else ''} of its case "
        "(the limits, kvstore and each peer alike; each run of the kvstore cases has a freshly started daemon "
        "and data directory, a peer's run is a put and its get): interference from the rest of the machine only "
        "ever slows a run down. Latencies are those of the best run.",
        "- Each block size starts with one unmeasured call per kind of call and client. "
        + (
            "Each store (the daemon, each peer) first takes one unmeasured put of the largest case, removed "
            "before the timed cases, so that first touches of its memory (page faults) are not timed."
            if settings.get("warmup", True)
            else "The stores are fresh (--no-warmup): the first cases also pay the first touch of their memory."
        ),
    ]
    for line in settings.get("peers", []):
        lines.append(f"- peer {line}")
    for note in notes:
        lines.append(f"- {note}")
    if settings.get("plot"):
        lines += ["", f"Plot: `{settings['plot']}`"]
    return "\n".join(lines) + "\n"


def sdk_json(info: dict, settings: dict, results: list[Result], notes: list[str]) -> dict:
    index = Index(results)
    rows = []
    for r in results:
        row = r.to_dict()
        row["vs"] = {
            system: index.times(r, system) for system in (MEMCPY, TCP, *index.peers) if system != r.system
        }
        rows.append(row)
    return {"machine": info, "settings": settings, "results": rows, "targets": targets(index), "notes": notes}


# -- the storage layout benchmark ---------------------------------------------------


def render_storage(info: dict, settings: dict, results: list[Result]) -> str:
    lines = [f"# kvstore storage layout: where {size_label(settings['value_size'])} block values should live", ""]
    lines += _machine_lines(info)
    lines += [
        f"- **workload**: {settings['count']} values of {size_label(settings['value_size'])} "
        f"({size_label(settings['count'] * settings['value_size'])}) per layout, one writer thread, "
        f"median of {settings['repeats']} runs",
        f"- **directory**: {_where(settings['directory'], settings.get('filesystem'))}",
        "",
    ]
    plain = {r.case.rsplit(", ", 1)[1]: r for r in results if r.case.startswith("plain file")}
    rows = []
    for result in results:
        layout, ending = result.case.rsplit(", ", 1)
        reference = plain.get(ending)
        rows.append(
            [
                layout,
                ending,
                rate(result.gbps),
                count(result.ops_per_s),
                share(result.gbps, reference.gbps if reference else None),
            ]
        )
    lines += markdown_table(["layout", "end", "GB/s", "values/s", "vs plain file"], rows, "llrrr")
    lines += [
        "",
        "## Notes",
        "",
        "- rocksdb blob files: `Rdict.put` of each value with integrated BlobDB (`enable_blob_files`, "
        "`min_blob_size` 4096) and default write options; every value goes to the WAL and then, at "
        "memtable flush, to a blob file.",
        "- segment file + index: each value `os.pwrite` at the end of one segment file, then a small "
        "(segment, offset, length) entry put into RocksDB (default write options), as the daemon does.",
        "- plain file: each value `os.write` to one file: the page-cache (or disk) limit.",
        "- end \"no sync\": timing stops after the last write (data may sit in the page cache). "
        "End \"fsync\": timing includes making it durable: `fsync` of the file(s); for RocksDB also "
        "`flush()` (memtable to blob files, which RocksDB syncs) and `flush_wal(sync=True)`.",
        "- The page cache is written back (`sync`) before each run so earlier runs do not slow it.",
    ]
    return "\n".join(lines) + "\n"


def storage_json(info: dict, settings: dict, results: list[Result]) -> dict:
    return {"machine": info, "settings": settings, "results": [r.to_dict() for r in results]}


# -- files -------------------------------------------------------------------------


def write_report(markdown: str, data: dict, output: str | os.PathLike) -> tuple[Path, Path]:
    """Write the table to ``output`` and the raw numbers to the same name with .json."""
    md_path = Path(output)
    json_path = md_path.with_suffix(".json")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    return md_path, json_path
