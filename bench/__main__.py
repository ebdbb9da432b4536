"""``python -m bench``: kvstore's put/get next to memcpy, loopback TCP and peer stores;
``python -m bench storage``: layouts on disk; ``python -m bench cluster``: 1, 2 and 3 daemons, R=2;
``python -m bench lookups``: prefix-lookup latency."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench import cluster, lookups, plot, report, ring, storage, suite
from bench.kvstore_runner import DAEMON_UCX_TLS, MIN_BLOCK_SIZE, Admin, start_daemon
from bench.measure import BenchError, best_runs
from bench.peers import ALL_PEERS, DEFAULT_PEERS, available_peers
from bench.progress import Progress
from bench.workers import WorkerPool
from kvstore.errors import KVStoreError
from kvstore.units import parse_size

DEFAULT_SIZES = "64KiB,1MiB,16MiB"
DEFAULT_CONCURRENCY = "1,4"
DEFAULT_BATCH, QUICK_BATCH = 32, 8
VOLUME, QUICK_VOLUME = 512 << 20, 16 << 20
MIN_CALLS, QUICK_MIN_CALLS = 4, 1
REPEATS, QUICK_REPEATS = 3, 1
STORAGE_REPEATS = 5  # disk timings are noisier than memory ones
MAX_BLOCK_SIZE = 256 << 20  # the daemon's default max_value_size
DAEMON_MEMORY = "4GiB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Put and get GB/s and latency of kvstore (zero-copy over shared memory and over TCP, inline) "
        "against one local daemon, from 1 and 4 client processes, next to memcpy, loopback TCP and peer "
        "stores (Redis, Mooncake Store, LMCache) measured in the same run; a table and a PNG plot.",
    )
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated block sizes (default {DEFAULT_SIZES})")
    p.add_argument(
        "--batch", type=int, help=f"blocks per call (default {DEFAULT_BATCH}; {QUICK_BATCH} with --quick)"
    )
    p.add_argument(
        "--concurrency", default=DEFAULT_CONCURRENCY,
        help=f"comma-separated client process counts, each case run with each (default {DEFAULT_CONCURRENCY})",
    )
    p.add_argument("--volume", help="bytes to move per case over all its clients (default 512MiB; 16MiB with --quick)")
    p.add_argument(
        "--min-calls", type=int,
        help=f"calls per case at least, for latency samples (default {MIN_CALLS}; {QUICK_MIN_CALLS} with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke-test sized run (well under a minute)")
    p.add_argument("--daemon-memory", default=DAEMON_MEMORY, help=f"the daemon's memory tier (default {DAEMON_MEMORY})")
    p.add_argument("--data-dir", help="the daemon's data directory (default: a temporary one, removed after)")
    p.add_argument(
        "--max-batch-bytes",
        help="max_batch_bytes of the kvstore clients: the SDK splits a call into RPCs of at most this many bytes "
        "(default: the SDK's, 32MiB)",
    )
    p.add_argument(
        "--repeats", type=int,
        help=f"runs of every case (memcpy, TCP, kvstore and each peer); the best of each is kept (default {REPEATS}; "
        f"{QUICK_REPEATS} with --quick)",
    )
    p.add_argument(
        "--output",
        help=f"markdown file to write (default {_shown(report.DEFAULT_OUTPUT)}); raw numbers go next to it as "
        ".json, the plot as .png",
    )
    p.add_argument("--no-progress", action="store_true", help="draw no progress bar")
    p.add_argument(
        "--no-warmup", action="store_true",
        help="measure fresh stores: skip the unmeasured put of the largest case that touches each store's memory first",
    )
    p.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help=f"other stores measured after kvstore, comma-separated of {', '.join(ALL_PEERS)}, or 'none' "
        f"(default {','.join(DEFAULT_PEERS)}); one not installed is skipped with a note (bench/peers/README.md)",
    )

    sub = p.add_subparsers(dest="command", metavar="{storage,ring,cluster,lookups}")
    s = sub.add_parser(
        "storage",
        help="storage layout micro-benchmark (RocksDB blobs vs segment files vs a plain file)",
        description="Write N values to RocksDB with blob files, to a segment file indexed by RocksDB, "
        "and to a plain file, without and with fsync at the end.",
    )
    s.add_argument("--count", type=int, default=256, help="values per run (default 256)")
    s.add_argument("--value-size", default="1MiB", help="size of each value (default 1MiB)")
    s.add_argument("--dir", help="directory to write under (default: the system temporary directory)")
    # SUPPRESS: given before "storage", these must not be reset by the subcommand's defaults.
    s.add_argument("--repeats", type=int, default=argparse.SUPPRESS, help=f"runs per layout; the median is kept (default {STORAGE_REPEATS})")
    s.add_argument("--output", default=argparse.SUPPRESS, help=f"markdown file to write (default {_shown(report.DEFAULT_STORAGE_OUTPUT)})")
    s.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help="draw no progress bar")
    sub.add_parser("ring", help="placement ring balance and movement figures (python -m bench.ring takes options)")
    sub.add_parser("cluster", help="aggregate GB/s of 1, 2 and 3 daemons and R=2 against R=1 (python -m bench cluster --help)")
    sub.add_parser("lookups", help="lookup_prefix / exists latency, 1 to 4096 keys, local channel and gRPC (python -m bench lookups --help)")
    return p


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _size(parser: argparse.ArgumentParser, flag: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        parser.error(f"{flag}: {exc}")


def _default(value, default):
    return default if value is None else value


def _zero_copy_unavailable() -> str | None:
    try:
        from kvstore import _native
    except ImportError as exc:
        return f"kvstore._native is not built ({exc})"
    if not _native.available():
        return _native.unavailable_reason() or "UCX is unavailable"
    return None


def run_sdk(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    sizes = list(dict.fromkeys(_size(parser, "--sizes", part) for part in args.sizes.split(",") if part.strip()))
    if not sizes:
        parser.error("--sizes: give at least one block size")
    for size in sizes:
        if not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE:
            parser.error(f"--sizes: {size} bytes is outside {MIN_BLOCK_SIZE} B .. 256 MiB")
    try:
        levels = sorted({int(part) for part in args.concurrency.split(",") if part.strip()})
    except ValueError:
        parser.error("--concurrency: give comma-separated whole numbers, e.g. 1,4")
    if not levels or levels[0] < 1 or levels[-1] > 64:
        parser.error("--concurrency: client counts must be between 1 and 64")
    volume = _size(parser, "--volume", args.volume) if args.volume else (QUICK_VOLUME if args.quick else VOLUME)
    min_calls = _default(args.min_calls, QUICK_MIN_CALLS if args.quick else MIN_CALLS)
    repeats = _default(args.repeats, QUICK_REPEATS if args.quick else REPEATS)
    batch = _default(args.batch, QUICK_BATCH if args.quick else DEFAULT_BATCH)
    memory = _size(parser, "--daemon-memory", args.daemon_memory)
    max_batch_bytes = _size(parser, "--max-batch-bytes", args.max_batch_bytes) if args.max_batch_bytes else None
    if batch < 1 or min_calls < 1 or repeats < 1 or volume < 1:
        parser.error("--batch, --min-calls, --repeats and --volume must be positive")
    plan = suite.Plan(sizes=sizes, batch=batch, levels=levels, volume=volume, min_calls=min_calls)
    try:
        suite.check_sizes(plan, memory)
    except BenchError as exc:
        parser.error(str(exc))
    names = [] if args.peers.strip().lower() == "none" else [n.strip() for n in args.peers.split(",") if n.strip()]
    try:
        # Mooncake evicts above 90% of its segment: room for the largest case twice over.
        peers = available_peers(names, segment_bytes=max(2 << 30, 2 * plan.largest_case()))
    except ValueError as exc:
        parser.error(f"--peers: {exc}")

    no_zero_copy = _zero_copy_unavailable()
    modes = ("inline",) if no_zero_copy else ("shm", "engine", "tcp", "inline")
    disk_modes = ("inline",) if no_zero_copy else ("shm", "engine")
    info = report.machine_info()
    owned_dir = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="kvstore-bench-") if owned_dir else args.data_dir)
    output = Path(args.output or report.DEFAULT_OUTPUT)
    settings = {
        "sizes": sizes,
        "batch": batch,
        "concurrency": levels,
        "volume": volume,
        "min_calls": min_calls,
        "repeats": repeats,
        "quick": args.quick,
        "daemon_memory": memory,
        "daemon_ucx_tls": DAEMON_UCX_TLS,
        "max_batch_bytes": max_batch_bytes,
        "warmup": not args.no_warmup,
        "data_dir": str(data_dir),
        "data_dir_filesystem": report.filesystem_of(data_dir),
        "calls_per_client": {f"{size}x{c}": plan.calls(size, c) for size in sizes for c in levels},
        "peers": [],
    }
    notes: list[str] = []
    if no_zero_copy:
        notes.append(f"kvstore zero-copy rows: skipped: {no_zero_copy}")
    kv_cases = 2 * len(modes) + len(disk_modes)
    peer_cases = 2 * sum(1 for spec in peers if spec.reason is None)
    total = plan.total_bytes(kv_cases, peer_cases) * repeats
    results = []
    daemon = None
    pool = None
    try:
        with Progress(total, enabled=not args.no_progress) as progress:
            kv_results = []
            settings["daemon_exit_status"] = 0
            for number, run in enumerate(suite.runs(repeats)):
                # A fresh daemon and data directory for each run of the kvstore cases: a daemon does
                # not reclaim the disk space of dropped blocks, and each run writes gigabytes back.
                run_dir = data_dir / f"run-{number + 1}"
                # The daemon starts first so that a bad setting fails the run at once; it idles during the limits.
                progress.stage(f"starting kvstore-server and client processes{run}")
                daemon = start_daemon(run_dir, memory, "--ucx-tls", DAEMON_UCX_TLS)
                progress.stage(f"waiting for kvstore-server to prefault its memory tier{run}")
                if Admin(daemon.address).wait_resident() is None:
                    notes.append("kvstore: the daemon's memory tier was still being prefaulted when the cases began.")
                pool = WorkerPool(plan.processes, levels)
                try:
                    if number == 0:
                        results += suite.run_limits(pool, plan, progress, repeats=repeats)
                    run_results, run_notes, described = suite.run_kvstore(
                        pool, daemon.address, plan, progress, modes=modes, disk_modes=disk_modes,
                        max_batch_bytes=max_batch_bytes, warm=not args.no_warmup,
                    )
                    kv_results += run_results
                    notes += run_notes
                    settings["kvstore_clients"] = described
                    stats = Admin(daemon.address).stats()
                    settings["daemon_data_plane"] = stats["data_plane"]
                except (KVStoreError, BenchError) as exc:
                    raise BenchError(f"{exc}\n--- kvstore-server log ---\n{daemon.log_tail()}") from exc
                finally:
                    progress.stage(f"stopping kvstore-server{run}")
                    pool.shutdown()
                    pool = None
                    status = daemon.stop(120)
                    settings["daemon_exit_status"] = settings["daemon_exit_status"] or status
                    shutil.rmtree(run_dir, ignore_errors=True)
            results += best_runs(kv_results)
            notes = list(dict.fromkeys(notes))
            # Peers run after the daemon has stopped, each alone on the machine with fresh client
            # processes; one that fails is noted, not fatal.
            for spec in peers:
                if spec.reason:
                    settings["peers"].append(f"{spec.name}: skipped: {spec.reason}")
                    continue
                progress.stage(f"starting {spec.name}")
                try:
                    with spec.factory() as peer:
                        described = peer.describe()
                        pool = WorkerPool(plan.processes, levels)
                        try:
                            peer_results, peer_notes = suite.run_peer(
                                pool, peer, plan, progress, warm=not args.no_warmup, repeats=repeats
                            )
                        finally:
                            pool.shutdown()
                            pool = None
                        settings["peers"].append(described + (f"; {', '.join(map(str, levels))} client processes"
                                                              if peer.max_clients is None else ""))
                        results += peer_results
                        notes += peer_notes
                except BenchError as exc:
                    settings["peers"].append(f"{spec.name}: FAILED: {str(exc).splitlines()[0]}")
                    print(f"bench: {spec.name} failed: {exc}", file=sys.stderr)
    finally:
        if pool is not None:
            pool.shutdown()
        if daemon is not None:
            daemon.stop(120)
        if owned_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    info["load_average_end"] = report._load()
    why_no_plot = plot.unavailable()
    png = output.with_suffix(".png")
    if why_no_plot is None:
        settings["plot"] = str(png)
    else:
        notes.append(f"plot: skipped: {why_no_plot}")
    markdown = report.render_sdk(info, settings, results, notes)
    print(markdown, end="")
    paths = report.write_report(markdown, report.sdk_json(info, settings, results, notes), output)
    if why_no_plot is None:
        plot.write_plot(results, png, title=f"kvstore bench, batches of {plan.batch} blocks ({info['date']})")
        paths = (*paths, png)
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
    status = settings["daemon_exit_status"]
    if status != 0:
        print(f"bench: kvstore-server exited with status {status} on SIGTERM\n{daemon.log_tail()}", file=sys.stderr)
        return 1
    return 0


def run_storage(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    value_size = _size(parser, "--value-size", args.value_size)
    repeats = _default(args.repeats, STORAGE_REPEATS)
    if args.count < 1 or value_size < 1 or repeats < 1:
        parser.error("--count, --value-size and --repeats must be positive")
    parent = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="kvstore-layout-", dir=parent))
    settings = {
        "count": args.count,
        "value_size": value_size,
        "repeats": repeats,
        "directory": str(directory),
        "filesystem": report.filesystem_of(directory),
    }
    info = report.machine_info()
    try:
        total = storage.total_bytes(args.count, value_size, repeats)
        with Progress(total, enabled=not args.no_progress) as progress:
            results = storage.run_storage(directory, count=args.count, value_size=value_size, repeats=repeats, progress=progress)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    markdown = report.render_storage(info, settings, results)
    print(markdown, end="")
    output = args.output or report.DEFAULT_STORAGE_OUTPUT
    paths = report.write_report(markdown, report.storage_json(info, settings, results), output)
    print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cluster"]:  # options of its own, parsed by bench.cluster
        return cluster.main(argv[1:])
    if argv[:1] == ["lookups"]:  # options of its own, parsed by bench.lookups
        return lookups.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "storage":
            return run_storage(args, parser)
        if args.command == "ring":
            ring.main([])
            return 0
        return run_sdk(args, parser)
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
