"""``python -m bench``: SDK throughput against one daemon; ``python -m bench storage``: layouts on disk."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from bench import limits, report, storage
from bench.kvstore_runner import MIN_BLOCK_SIZE, Daemon, run_sizes
from bench.measure import BenchError, blocks_for
from bench.peers import ALL_PEERS, DEFAULT_PEERS, available_peers, run_peer
from bench.progress import Progress
from kvstore.errors import KVStoreError
from kvstore.units import parse_size

DEFAULT_SIZES = "64KiB,1MiB,16MiB"
VOLUME, QUICK_VOLUME = 256 << 20, 32 << 20
MIN_CALLS, QUICK_MIN_CALLS = 4, 2
REPEATS = 3
STORAGE_REPEATS = 5  # disk timings are noisier than memory ones
MAX_BLOCK_SIZE = 256 << 20  # the daemon's default max_value_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Put and get GB/s, ops/s and latency through the kvstore SDK against one local daemon, "
        "next to memcpy and loopback TCP measured in the same run.",
    )
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated block sizes (default {DEFAULT_SIZES})")
    p.add_argument("--batch", type=int, default=8, help="blocks per put_many/get_many call (default 8)")
    p.add_argument("--volume", help="bytes to move per case (default 256MiB; 32MiB with --quick)")
    p.add_argument(
        "--min-calls", type=int, help=f"calls per case at least, for latency samples (default {MIN_CALLS}; {QUICK_MIN_CALLS} with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="a smoke-test sized run (well under a minute)")
    p.add_argument("--daemon-memory", default="2GiB", help="the daemon's memory tier (default 2GiB)")
    p.add_argument("--data-dir", help="the daemon's data directory (default: a temporary one, removed after)")
    p.add_argument("--repeats", type=int, help=f"runs of each reference limit; the best is kept (default {REPEATS})")
    p.add_argument("--output", help=f"markdown file to write (default {_shown(report.DEFAULT_OUTPUT)}); raw numbers go next to it as .json")
    p.add_argument("--no-progress", action="store_true", help="draw no progress bar")
    p.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help=f"other stores measured after kvstore, comma-separated of {', '.join(ALL_PEERS)}, or 'none' "
        f"(default {','.join(DEFAULT_PEERS)}); one not installed is skipped with a note (bench/peers/README.md)",
    )

    sub = p.add_subparsers(dest="command", metavar="{storage}")
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


def run_sdk(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    sizes = list(dict.fromkeys(_size(parser, "--sizes", part) for part in args.sizes.split(",") if part.strip()))
    if not sizes:
        parser.error("--sizes: give at least one block size")
    for size in sizes:
        if not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE:
            parser.error(f"--sizes: {size} bytes is outside {MIN_BLOCK_SIZE} B .. 256 MiB")
    volume = _size(parser, "--volume", args.volume) if args.volume else (QUICK_VOLUME if args.quick else VOLUME)
    min_calls = _default(args.min_calls, QUICK_MIN_CALLS if args.quick else MIN_CALLS)
    repeats = _default(args.repeats, REPEATS)
    memory = _size(parser, "--daemon-memory", args.daemon_memory)
    if args.batch < 1 or min_calls < 1 or repeats < 1 or volume < 1:
        parser.error("--batch, --min-calls, --repeats and --volume must be positive")
    blocks = {size: blocks_for(volume, size, batch=args.batch, min_calls=min_calls) for size in sizes}
    names = [] if args.peers.strip().lower() == "none" else [n.strip() for n in args.peers.split(",") if n.strip()]
    try:
        # Mooncake evicts above 90% of its segment: room for the largest case twice over.
        peers = available_peers(names, segment_bytes=max(2 << 30, 2 * max(n * s for s, n in blocks.items())))
    except ValueError as exc:
        parser.error(f"--peers: {exc}")

    info = report.machine_info()
    owned_dir = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="kvstore-bench-") if owned_dir else args.data_dir)
    settings = {
        "sizes": sizes,
        "batch": args.batch,
        "volume": volume,
        "min_calls": min_calls,
        "repeats": repeats,
        "quick": args.quick,
        "daemon_memory": memory,
        "data_dir": str(data_dir),
        "data_dir_filesystem": report.filesystem_of(data_dir),
        "blocks_per_case": {str(size): n for size, n in blocks.items()},
        "peers": [],
    }
    # Three kvstore cases and two limits (each run ``repeats`` times) per size.
    total = sum(n * size * (3 + 2 * repeats) for size, n in blocks.items())
    total += sum(2 * n * size for size, n in blocks.items()) * sum(1 for spec in peers if spec.reason is None)
    daemon_status = None
    try:
        with Progress(total, enabled=not args.no_progress) as progress:
            # The daemon starts first so that a bad setting fails the run at once; it idles during the limits.
            progress.stage("starting kvstore-server")
            daemon = Daemon(data_dir, memory).start()
            try:
                measured = {}
                for size in sizes:
                    label = report.size_label(size)
                    progress.stage(f"{label} memcpy")
                    copy = limits.memcpy(size, blocks[size], repeats=repeats, progress=progress)
                    progress.stage(f"{label} loopback TCP")
                    tcp = limits.tcp_loopback(size, blocks[size], repeats=repeats, progress=progress)
                    measured[size] = [copy, tcp]
                runs = asyncio.run(run_sizes(daemon.address, sizes, blocks, batch=args.batch, progress=progress))
            except KVStoreError as exc:
                raise BenchError(f"{type(exc).__name__}: {exc}\n--- kvstore-server log ---\n{daemon.log_tail()}") from exc
            finally:
                progress.stage("stopping kvstore-server")
                daemon_status = daemon.stop()
            # Peers run after the daemon has stopped, each alone on the machine; one that fails is noted, not fatal.
            for spec in peers:
                if spec.reason:
                    settings["peers"].append(f"{spec.name}: skipped: {spec.reason}")
                    continue
                progress.stage(f"starting {spec.name}")
                try:
                    with spec.factory() as peer:
                        settings["peers"].append(peer.describe())
                        for size in sizes:
                            measured[size].extend(run_peer(peer, size, blocks[size], batch=args.batch, progress=progress))
                except BenchError as exc:
                    settings["peers"].append(f"{spec.name}: FAILED: {str(exc).splitlines()[0]}")
                    print(f"bench: {spec.name} failed: {exc}", file=sys.stderr)
    finally:
        if owned_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    for run in runs:
        run.results.extend(measured[run.block_size])
    settings["daemon_exit_status"] = daemon_status
    markdown = report.render_sdk(info, settings, runs)
    print(markdown, end="")
    paths = report.write_report(markdown, report.sdk_json(info, settings, runs), args.output or report.DEFAULT_OUTPUT)
    print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    if daemon_status != 0:
        print(f"bench: kvstore-server exited with status {daemon_status} on SIGTERM\n{daemon.log_tail()}", file=sys.stderr)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "storage":
            return run_storage(args, parser)
        return run_sdk(args, parser)
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
