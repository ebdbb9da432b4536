"""Cluster scaling: aggregate put and get GB/s of 1, 2 and 3 ``kvstore-server``
daemons (R=1), and the cost of R=2 against R=1 on 3 daemons.

``python -m bench cluster`` (also ``python -m bench.cluster``) runs, per repeat,
for each configuration in turn (1 daemon, 2, 3, then 3 with R=2):

  1. N real ``kvstore-server`` subprocesses on loopback (a kvstore.harness
     ``LocalCluster``), static membership (``--node-id nodeK --peers
     node1=127.0.0.1:P1,...`` on ports chosen up front), ``--replicas R``, a
     memory tier big enough for every block of one case, each with a data
     dir of its own;
  2. the same C client processes (``--clients``, default 3, for every
     configuration, so that only the daemons change: a bench.workers
     ``WorkerPool``), each an SDK ``Client`` given every endpoint, with the
     SDK's default transport ("auto": the zero-copy data plane when both sides
     have it) and buffers from ``Client.allocate``; each puts its own keys
     with ``put_from`` in batches of 32 blocks of 1 MiB, then reads them back
     with ``get_into``, and checks every byte;
  3. a timed put (durability "memory"), a wait for the daemons'
     write-back and ``sync`` so that background disk work stays out of the
     next case, a timed get of those keys, the namespace dropped, a timed put
     with durability "disk" (then the same wait), the namespace dropped: every
     case starts from an empty store;
  4. the daemons stopped with SIGTERM and their data dirs removed.

Repeats are the outer loop: every repeat starts fresh daemons, and a slow spell
of this shared machine falls on all configurations alike.

A case's GB/s is all its bytes over the wall time from the earliest client's
start (after a shared barrier) to the last client's finish; the best of the
repeats is kept (interference only ever slows a run down), every repeat is in
the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.measure import BenchError, Result
from bench.workers import Case, WorkerPool
from kvstore.harness.cluster import LocalCluster
from kvstore.harness.daemon import BIND_FAILED
from kvstore.harness.process import HarnessError

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "cluster.md"
CONFIGS = ((1, 1), (2, 1), (3, 1), (3, 2))  # (daemons, replicas)
BLOCK_SIZE = 1 << 20
BATCH = 32
CLIENTS = 3
VOLUME, QUICK_VOLUME = 1 << 30, 96 << 20  # bytes per timed case over all clients
REPEATS, QUICK_REPEATS = 5, 1
TENANT, SUBTENANT = "bench", "cluster"
SYSTEM = "kvstore cluster"
OPS = ("put", "get", "put (disk)")
SETTLE_TIMEOUT = 300.0
NOTE = (
    "This machine has {cpus} CPU cores, shared by every daemon and every client process of a "
    "configuration: more daemons add no CPU, so aggregate scaling here is bounded by the machine, "
    "not by the design (on separate hosts each daemon brings its own cores, memory bandwidth and NIC). "
    "Here a ratio can even fall below 1: a batch is split into one RPC per daemon that owns some of its keys, "
    "and more processes compete for the same cores."
)


# -- the daemons -----------------------------------------------------------------


class BenchCluster:
    """N ``kvstore-server`` subprocesses that know each other through ``--peers`` (a
    kvstore.harness LocalCluster under ``root``), and the bench's admin calls to them."""

    def __init__(self, root: Path, nodes: int, replicas: int, memory: int, extra: tuple[str, ...] = ()) -> None:
        self.root = Path(root)
        self.nodes = nodes
        self.replicas = replicas
        self.memory = memory
        self.extra = extra
        self.local: LocalCluster | None = None
        self.exit_codes: list[int | None] = []

    @property
    def endpoints(self) -> list[str]:
        return self.local.endpoints

    def start(self, timeout: float = 60, attempts: int = 2) -> "BenchCluster":
        for attempt in range(1, attempts + 1):
            self.local = LocalCluster.create(
                self.root,
                self.nodes,
                replicas=self.replicas,
                memory=str(self.memory),
                # INFO lines in the log tails a failed run prints, whatever KVSTORE_LOG_LEVEL says.
                server_args=("--log-level", "INFO", *self.extra),
                die_with_parent=True,
            )
            try:
                self.local.start(timeout)
                return self
            except HarnessError as exc:
                # A port chosen up front can be taken by another program before the daemon binds it: once more.
                if attempt == attempts or BIND_FAILED not in str(exc):
                    raise BenchError(f"kvstore-server did not start: {exc}") from None
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 60) -> list[int | None]:
        """SIGTERM to every daemon at once, then wait for each (SIGKILL past ``timeout``); their exit statuses."""
        self.local.stop(timeout)
        self.exit_codes = [node.returncode for node in self.local.nodes]
        return self.exit_codes

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- {n.name} ---\n{n.log_tail(lines)}" for n in self.local.nodes)

    # -- admin calls from the bench process, on a short-lived inline client --

    def _admin(self, fn):
        from kvstore.client import Client

        async def go():
            async with Client(self.endpoints, tenant=TENANT, subtenant=SUBTENANT, transport="inline") as kv:
                return await fn(kv)

        return asyncio.run(go())

    def stats(self) -> list[dict]:
        """server_stats() of every node (``Client.cluster_stats``)."""
        return self._admin(lambda kv: kv.cluster_stats())

    def cluster_map(self) -> dict:
        async def get(kv):
            await kv.connect()
            return kv.cluster_map()

        return self._admin(get)

    def drop(self) -> int:
        """Delete the bench's namespace on every node (blocks dropped): each case starts from an
        empty store, and the memory tiers need room for one case only."""
        return self._admin(lambda kv: kv.drop_namespace())["blocks"]

    def settle(self, timeout: float = SETTLE_TIMEOUT) -> float:
        """Wait until every node's disk tier holds every block of its memory tier (the write-back
        of "memory" puts is done), then ``sync``: one case's background disk work must not slow
        the next. Seconds waited, the sync included."""

        async def wait(kv):
            began = time.perf_counter()
            while True:
                nodes = await kv.cluster_stats()
                down = [n["node_id"] for n in nodes if not n.get("up", True)]
                if down:
                    raise BenchError(f"daemons not answering: {', '.join(down)}")
                if all(n["tiers"]["disk"]["blocks"] >= n["tiers"]["memory"]["blocks"] for n in nodes):
                    return time.perf_counter() - began
                if time.perf_counter() - began > timeout:
                    raise BenchError(f"write-back was not done after {timeout:.0f} s")
                await asyncio.sleep(0.05)

        began = time.perf_counter()
        self._admin(wait)
        os.sync()
        return time.perf_counter() - began

    def wait_resident(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until every daemon has prefaulted its memory tier (start-up work that would
        otherwise overlap the first cases)."""

        async def wait(kv):
            began = time.perf_counter()
            while True:
                tiers = [n["tiers"]["memory"] for n in await kv.cluster_stats() if n.get("up", True)]
                if all(t["resident_bytes"] >= t["capacity_bytes"] for t in tiers):
                    return
                if time.perf_counter() - began > timeout:
                    raise BenchError(f"the memory tiers were not prefaulted after {timeout:.0f} s")
                await asyncio.sleep(0.1)

        self._admin(wait)


# -- the client processes ----------------------------------------------------------


def summary(result: Result) -> dict:
    """A timed case over every client process, as the JSON keeps it."""
    latencies = sorted(result.latencies)
    return {
        "bytes": result.nbytes,
        "seconds": result.seconds,
        "gbps": result.gbps,
        "calls": len(latencies),
        "call_p50_ms": 1e3 * latencies[len(latencies) // 2],
        "call_max_ms": 1e3 * latencies[-1],
    }


# -- the run -------------------------------------------------------------------


def daemon_memory(stored_bytes: int, nodes: int) -> int:
    """A memory tier for one daemon that holds its share of ``stored_bytes`` with room for the
    ring's imbalance (a node can own well above 1/N of a few hundred keys)."""
    share = stored_bytes / nodes
    return int(math.ceil((share * 1.6 + (256 << 20)) / (64 << 20))) * (64 << 20)


def _measure(cluster: BenchCluster, pool: WorkerPool, row: dict, name: str, ops, *, tag: str, calls: int,
             block_size: int, batch: int, log) -> None:
    """One repeat of every case of a started cluster, appended to ``row``."""
    cmap = cluster.cluster_map()
    if len(cmap["nodes"]) != cluster.nodes:
        raise BenchError(f"the cluster map has {len(cmap['nodes'])} nodes, not {cluster.nodes}")
    row["write_quorum"] = cmap["write_quorum"]
    # Every client is an SDK Client given every endpoint, with the SDK's default transport.
    pool.open({"kind": "kvstore", "address": cluster.endpoints, "mode": "auto", "tenant": TENANT,
               "subtenant": SUBTENANT, "warm_batch": True})
    try:
        pool.prepare(block_size, batch, [calls * batch] * pool.processes)
        described = pool.settings()
        row["client"] = described[0]
        row["zero_copy"] = all(d["zero_copy"] for d in described)
        cluster.settle()  # the warm-up batches' write-back
        for op in ops:
            durability = "disk" if op == "put (disk)" else "memory"
            # A get reads the keys of the "put" case before it: the same ``keys``.
            case = Case(SYSTEM, op, "cl", block_size, batch, calls, pool.processes, f"{tag}{durability[0]}", durability)
            result = summary(pool.run(case))
            row["repeats"].setdefault(op, []).append(result)
            log(f"{name}: {op}: {result['gbps']:.2f} GB/s ({report.size_label(result['bytes'])} in {result['seconds']:.2f} s)")
            if op == "put":
                result["settle_seconds"] = cluster.settle()  # the get reads these keys
                continue
            if op == "put (disk)":
                result["settle_seconds"] = cluster.settle()
            cluster.drop()  # every case starts from an empty store
            cluster.settle()
    finally:
        pool.close_driver()
    row["nodes"] = [
        {
            "node_id": s["node_id"],
            "memory_blocks": s["tiers"]["memory"]["blocks"],
            "disk_blocks": s["tiers"]["disk"]["blocks"],
            "evictions": s["evictions"],
            "data_plane": s["data_plane"],
        }
        for s in cluster.stats()
    ]
    row["evictions"] = row.get("evictions", 0) + sum(n["evictions"] for n in row["nodes"])


def run(
    *,
    volume: int = VOLUME,
    repeats: int = REPEATS,
    clients: int = CLIENTS,
    block_size: int = BLOCK_SIZE,
    batch: int = BATCH,
    disk: bool = True,
    configs=CONFIGS,
    directory: str | os.PathLike | None = None,
    log=print,
) -> dict:
    """Every configuration's cases; a dict of settings, results and notes (the JSON)."""
    calls = max(1, math.ceil(volume / (clients * batch * block_size)))
    case_bytes = calls * clients * batch * block_size
    ops = OPS if disk else OPS[:2]
    parent = Path(directory) if directory else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="kvstore-bench-cluster-", dir=parent))
    settings = {
        "configs": [{"daemons": n, "replicas": r} for n, r in configs],
        "clients": clients,
        "block_size": block_size,
        "batch": batch,
        "calls_per_client": calls,
        "bytes_per_case": case_bytes,
        "repeats": repeats,
        "ops": list(ops),
        "data_dir": str(root),
        "data_dir_filesystem": report.filesystem_of(root),
    }
    rows = {(n, r): {"daemons": n, "replicas": r, "repeats": {}, "daemon_exit_status": []} for n, r in configs}
    notes: list[str] = []
    pool = None
    # UCX's TCP transport would otherwise open connections on every interface; all of this is
    # loopback. Set here, so that the daemons and the client processes inherit it.
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    try:
        log(f"starting {clients} client processes")
        pool = WorkerPool(clients, levels=(clients,))  # every case runs in every client at once
        # Repeats outside, configurations inside: a slow spell of the machine (other work, the
        # disk) falls on every configuration alike, and every repeat starts fresh daemons.
        for rep in range(repeats):
            for nodes, replicas in configs:
                row = rows[(nodes, replicas)]
                name = f"{nodes} daemon{'s' if nodes > 1 else ''}, R={replicas}"
                if repeats > 1:
                    name += f" ({rep + 1}/{repeats})"
                # The most blocks the daemons hold at once (one case, the warm-up batches), R copies of each.
                stored = (case_bytes + 2 * clients * batch * block_size) * replicas
                memory = row["daemon_memory"] = daemon_memory(stored, nodes)
                cluster = BenchCluster(root / f"n{nodes}r{replicas}-{rep}", nodes, replicas, memory)
                log(f"{name}: starting daemons ({report.size_label(memory)} memory tier each)")
                cluster.start()
                try:
                    cluster.wait_resident()
                    _measure(cluster, pool, row, name, ops, tag=f"n{nodes}r{replicas}/{rep}", calls=calls,
                             block_size=block_size, batch=batch, log=log)
                except Exception as exc:
                    if isinstance(exc, BenchError) or type(exc).__module__.startswith("kvstore"):
                        raise BenchError(f"{name}: {exc}\n{cluster.log_tails()}") from exc
                    raise
                finally:
                    statuses = cluster.stop()
                    cluster.remove()
                row["daemon_exit_status"].append(statuses)
                if any(code != 0 for code in statuses):
                    notes.append(f"{name}: daemon exit statuses on SIGTERM: {statuses}")
    finally:
        if pool is not None:
            pool.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    rows = list(rows.values())
    for row in rows:
        for op, results in row["repeats"].items():
            row[op] = max(results, key=lambda r: r["gbps"])
        if row.get("evictions"):
            notes.append(f"{row['daemons']} daemons, R={row['replicas']}: {row['evictions']} blocks were evicted "
                         "from the memory tiers (too small for a case)")
    base = next((r for r in rows if r["daemons"] == 1 and r["replicas"] == 1), None)
    r1 = next((r for r in rows if r["daemons"] == 3 and r["replicas"] == 1), None)
    for row in rows:
        for op in ops:
            if base is not None:
                row.setdefault("vs_one_daemon", {})[op] = row[op]["gbps"] / base[op]["gbps"]
            if r1 is not None and row["daemons"] == 3:
                row.setdefault("vs_r1", {})[op] = row[op]["gbps"] / r1[op]["gbps"]
    return {"settings": settings, "rows": rows, "notes": notes}


# -- the report ----------------------------------------------------------------


def _transport(row: dict) -> str:
    c = row.get("client", {})
    if row.get("zero_copy"):
        return "zero-copy" + (" (shm)" if c.get("shared_memory_buffers") else "")
    return "inline"


def _load(figures) -> str:
    return "/".join(f"{x:.2f}" for x in figures) if figures else "?"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"×{x:.2f}"


def render(info: dict, figures: dict) -> str:
    s = figures["settings"]
    rows = figures["rows"]
    ops = s["ops"]
    lines = [
        "# kvstore cluster bench",
        "",
        f"{info['date']}; {info['cpu_count']} CPUs ({info['cpu_model']}), {report.size_label(info['memory_bytes'] or 0)} RAM; "
        f"kvstore {info['kvstore_version']} ({info.get('git_commit') or 'no git'}); data dirs on {s['data_dir_filesystem']}; "
        f"load average {_load(info.get('load_average'))} at the start, {_load(info.get('load_average_end'))} at the end.",
        "",
        f"{s['clients']} client processes in every configuration, each an SDK Client given every endpoint "
        f"(transport \"auto\"); blocks of {report.size_label(s['block_size'])} in batches of {s['batch']} "
        f"(put_from / get_into on Client.allocate buffers), distinct keys per client; "
        f"{report.size_label(s['bytes_per_case'])} per case ({s['calls_per_client']} calls per client); "
        f"best of {s['repeats']} run{'s' if s['repeats'] > 1 else ''} (each on freshly started daemons, the configurations "
        f"interleaved). Daemons: kvstore-server subprocesses on loopback, "
        f"static membership (--node-id, --peers); \"put\" is durability memory (write-back to disk after the "
        f"acknowledgement, waited for between cases), \"put (disk)\" is durability disk; every byte read is checked.",
        "",
        "## Scaling with daemons (R=1)",
        "",
    ]
    headers = ["daemons", "replicas"]
    for op in ops:
        headers += [f"{op} GB/s", "vs 1 daemon"]
    headers.append("transport")
    table = []
    for row in rows:
        if row["replicas"] != 1:
            continue
        cells = [str(row["daemons"]), "1"]
        for op in ops:
            cells += [report.rate(row[op]["gbps"]), _ratio(row.get("vs_one_daemon", {}).get(op))]
        cells.append(_transport(row))
        table.append(cells)
    lines += report.markdown_table(headers, table, "rr" + "rr" * len(ops) + "l")
    lines += ["", "## Replication on 3 daemons: R=2 against R=1", ""]
    headers = ["daemons", "replicas (W)"]
    for op in ops:
        headers += [f"{op} GB/s", "vs R=1"]
    headers.append("transport")
    table = []
    for row in rows:
        if row["daemons"] != 3:
            continue
        cells = ["3", f"{row['replicas']} ({row.get('write_quorum', '?')})"]
        for op in ops:
            cells += [report.rate(row[op]["gbps"]), _ratio(row.get("vs_r1", {}).get(op))]
        cells.append(_transport(row))
        table.append(cells)
    lines += report.markdown_table(headers, table, "rr" + "rr" * len(ops) + "l")
    lines += [
        "",
        "GB/s is aggregate: the bytes of every client over the wall time from the first client's start to "
        "the last one's finish. With R=2 a put sends every block to 2 daemons and is acknowledged when W of "
        "them hold it (GB/s counts each block once); a get reads one replica.",
        "",
        NOTE.format(cpus=info["cpu_count"]),
        "",
    ]
    for note in figures["notes"]:
        lines.append(f"- {note}")
    if figures["notes"]:
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench cluster",
        description="Aggregate put and get GB/s of 1, 2 and 3 kvstore-server daemons on loopback (R=1), and "
        "R=2 against R=1 on 3 daemons; a markdown table and its JSON.",
    )
    p.add_argument("--quick", action="store_true", help="a smoke-test sized run (well under a minute)")
    p.add_argument(
        "--volume",
        help=f"bytes per timed case over all clients, rounded up to whole batches per client "
        f"(default {report.size_label(VOLUME)}; {report.size_label(QUICK_VOLUME)} with --quick)",
    )
    p.add_argument("--repeats", type=int, help=f"runs of each case, the best kept (default {REPEATS}; {QUICK_REPEATS} with --quick)")
    p.add_argument("--clients", type=int, default=CLIENTS, help=f"client processes, the same for every configuration (default {CLIENTS})")
    p.add_argument("--no-disk", action="store_true", help="skip the put (disk) cases")
    p.add_argument("--dir", help="directory for the daemons' data dirs (default: the system temporary directory)")
    p.add_argument("--output", help="markdown file to write (default bench/results/cluster.md); the numbers go next to it as .json")
    p.add_argument("--no-progress", action="store_true", help="print no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    from kvstore.units import parse_size

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        volume = parse_size(args.volume) if args.volume else (QUICK_VOLUME if args.quick else VOLUME)
    except ValueError as exc:
        parser.error(f"--volume: {exc}")
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else REPEATS)
    if volume < 1 or repeats < 1 or not 1 <= args.clients <= 32:
        parser.error("--volume and --repeats must be positive, --clients between 1 and 32")

    def log(text: str) -> None:
        if not args.no_progress:
            print(f"bench cluster: {text}", file=sys.stderr, flush=True)

    info = report.machine_info()
    try:
        figures = run(volume=volume, repeats=repeats, clients=args.clients, disk=not args.no_disk, directory=args.dir, log=log)
    except BenchError as exc:
        print(f"bench cluster: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench cluster: interrupted", file=sys.stderr)
        return 130
    figures["settings"]["quick"] = args.quick
    info["load_average_end"] = report._load()
    markdown = render(info, figures)
    print(markdown, end="")
    output = Path(args.output) if args.output else DEFAULT_OUTPUT
    paths = report.write_report(markdown, {"machine": info, **figures}, output)
    print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
