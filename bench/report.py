"""Markdown tables of the results, machine information, and the files they go to."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from bench.measure import Result, SizeRun

KVSTORE_CASES = ("put (disk)", "put (memory)", "get")
LIMIT_CASES = ("memcpy", "loopback TCP")
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
    }
    for module in ("grpc", "numpy"):
        try:
            info[f"{module}_version"] = __import__(module).__version__
        except ImportError:
            info[f"{module}_version"] = None
    return info


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
    return [
        f"- **date**: {info['date']}",
        f"- **machine**: {info['cpu_count']} CPUs ({info['cpu_model']}){memory}, {info['platform']}",
        f"- **software**: Python {info['python']}, kvstore {info['kvstore_version']}{commit}, "
        f"grpcio {info.get('grpc_version')}, numpy {info.get('numpy_version')}",
    ]


# -- the SDK benchmark ---------------------------------------------------------


def render_sdk(info: dict, settings: dict, runs: list[SizeRun]) -> str:
    lines = ["# kvstore benchmark: SDK put/get against one daemon", ""]
    lines += _machine_lines(info)
    lines += [
        f"- **daemon**: one `kvstore-server` on 127.0.0.1, memory tier {size_label(settings['daemon_memory'])}, "
        f"data dir {_where(settings['data_dir'], settings.get('data_dir_filesystem'))}",
        f"- **client**: asyncio `Client`, {settings['batch']} blocks per `put_many`/`get_many` call, one call in flight",
        f"- **volume**: about {size_label(settings['volume'])} per case, at least {settings['min_calls']} calls"
        + (" (quick run)" if settings.get("quick") else ""),
        "",
        "## Throughput (GB/s)",
        "",
    ]
    summary = []
    for run in runs:
        row = [size_label(run.block_size)]
        for case in KVSTORE_CASES + LIMIT_CASES:
            result = run.get(case)
            row.append(rate(result.gbps) if result else "–")
        summary.append(row)
    lines += markdown_table(["block", *KVSTORE_CASES, *LIMIT_CASES], summary, "lrrrrr")

    peer_cases = _peer_cases(runs)
    if peer_cases:
        lines += ["", "## Peers (GB/s)", "", "Other stores on this machine, measured after kvstore with the same "
                  "blocks, batches and byte checks; kvstore's put (memory) and get repeated for reference.", ""]
        reference = ("put (memory)", "get")
        rows = []
        for run in runs:
            cells = [run.get(case) for case in (*reference, *peer_cases)]
            rows.append([size_label(run.block_size)] + [rate(r.gbps) if r else "–" for r in cells])
        headers = ["block", "kvstore put (memory)", "kvstore get", *peer_cases]
        lines += markdown_table(headers, rows, "l" + "r" * (len(headers) - 1))

    lines += ["", "## Detail", ""]
    detail = []
    for run in runs:
        memcpy, tcp = run.get("memcpy"), run.get("loopback TCP")
        for result in run.results:
            kv = result.case not in LIMIT_CASES  # kvstore's cases and the peers' are timed per call
            detail.append(
                [
                    size_label(run.block_size),
                    result.case,
                    rate(result.gbps),
                    count(result.ops_per_s),
                    millis(result.p50_ms),
                    millis(result.p99_ms),
                    str(result.calls) if kv else "–",
                    size_label(result.nbytes),
                    share(result.gbps, memcpy.gbps if memcpy else None) if result.case != "memcpy" else "–",
                    share(result.gbps, tcp.gbps if tcp else None) if kv else "–",
                ]
            )
    lines += markdown_table(
        ["block", "case", "GB/s", "ops/s", "p50 ms", "p99 ms", "calls", "moved", "vs memcpy", "vs TCP"],
        detail,
        "llrrrrrrrr",
    )

    lines += ["", "## Notes", ""]
    lines += [
        "- GB/s is 10^9 bytes per second; ops/s is blocks per second; p50/p99 are the latency of one "
        f"`put_many`/`get_many` call of {settings['batch']} blocks.",
        "- kvstore throughput is bytes over the time spent inside SDK calls; values are built and "
        "checked outside the timed calls. Each case starts with one unmeasured call.",
        "- put (disk): acknowledged once the value is appended to a segment file and indexed "
        "(in the OS page cache, not fsynced). put (memory): acknowledged once in the daemon's memory tier.",
        "- get reads back the blocks of the put (disk) case; every returned byte is compared with what was put.",
        f"- memcpy and loopback TCP move the same number of blocks; best of {settings['repeats']} runs. "
        "memcpy copies one block-sized buffer over and over, so small blocks stay in the CPU caches. "
        "TCP is one 127.0.0.1 connection: a sender thread, a receiver `recv_into` a preallocated buffer.",
        "- vs memcpy / vs TCP: the case's GB/s as a share of that limit at the same block size.",
    ]
    for line in settings.get("peers", []):
        lines.append(f"- peer {line}")
    for run in runs:
        for note in run.notes:
            lines.append(f"- {size_label(run.block_size)}, {note}")
    return "\n".join(lines) + "\n"


def _peer_cases(runs: list[SizeRun]) -> list[str]:
    """The peers' cases ("redis put", "mooncake (tcp) get"...), in the order they ran."""
    seen: list[str] = []
    for run in runs:
        for result in run.results:
            if result.case not in KVSTORE_CASES + LIMIT_CASES and result.case not in seen:
                seen.append(result.case)
    return seen


def sdk_json(info: dict, settings: dict, runs: list[SizeRun]) -> dict:
    sizes = []
    for run in runs:
        memcpy, tcp = run.get("memcpy"), run.get("loopback TCP")
        results = []
        for result in run.results:
            row = result.to_dict()
            if result.case not in LIMIT_CASES:
                row["vs_memcpy"] = result.gbps / memcpy.gbps if memcpy else None
                row["vs_tcp"] = result.gbps / tcp.gbps if tcp else None
            results.append(row)
        sizes.append({"block_size": run.block_size, "results": results, "notes": run.notes})
    return {"machine": info, "settings": settings, "sizes": sizes}


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
