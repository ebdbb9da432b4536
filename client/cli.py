"""``kvstore``: the command-line client.

    kvstore [--endpoint H:P] [--tenant T] [--subtenant S] [--token TOKEN] [--admin-token TOKEN] [--json] COMMAND ...
      put KEY FILE|-          store a file (or stdin) under KEY
      get KEY [-o FILE]       write a block to stdout or FILE; exit 1 on a miss
      exists KEY...           print which keys are stored; exit 1 if any is not
      rm KEY...               delete blocks; print how many existed
      ls [--prefix P]         list keys with their sizes
      stat                    blocks and bytes per tier, namespaces, uptime, cluster, rebalancing
      ns ls                   namespaces with blocks and bytes, cluster-wide
      ns create|drop [--tenant T] [--subtenant S]
                              create a namespace (--auth token: data tokens work
                              only on created ones) or drop it with every block
      ns get|set [--tenant T] [--subtenant S] [--replicas R] [--write-quorum W]
                              a namespace's replication (set: on every node)
      token create --tenant T [--subtenant S] [--read-only] [--description D]
                              a data token for a tenant or one subtenant, printed once
      token ls [--tenant T]   data tokens (ids, scope; never secrets)
      token revoke ID         revoke a data token on every daemon
      cluster up [--nodes N] [--etcd] [--dir DIR] [--replicas R] [--write-quorum W]
                 [--memory SIZE] [--base-port P] [-- SERVER_FLAGS...]
                              start N daemons on loopback in the background
                              (default 3 in ./kvstore-cluster); print the endpoints
      cluster status [--dir DIR | --endpoint H:P[,...]]
                              per node: health, epoch, blocks and bytes, data plane,
                              rebalancing; exit 1 unless every node is up
      cluster down [--dir DIR]
                              stop the daemons (and etcd) of DIR

Data commands present --token ($KVSTORE_TOKEN); stat, ns and token present
--admin-token ($KVSTORE_ADMIN_TOKEN) when given, else --token.

Keys are given as text and stored as their UTF-8 bytes; prefix one with
``hex:`` to give raw bytes (``hex:00ff``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from kvstore import __version__
from kvstore.client.config import DEFAULT_ENDPOINT, ClientConfig
from kvstore.client.sync import SyncClient
from kvstore.durability import NAMES as DURABILITIES
from kvstore.errors import KVStoreError, PermissionDeniedError
from kvstore.harness import cluster as localcluster
from kvstore.harness.process import HarnessError
from kvstore.units import format_size

EXIT_MISS = 1
EXIT_ERROR = 2


def parse_key(text: str) -> bytes:
    if text.startswith("hex:"):
        try:
            return bytes.fromhex(text[4:])
        except ValueError:
            raise KVStoreErrorArg(f"{text!r} is not valid hex") from None
    return text.encode()


def show_key(key: bytes) -> str:
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return "hex:" + key.hex()
    return text if text.isprintable() and not text.startswith("hex:") else "hex:" + key.hex()


class KVStoreErrorArg(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvstore", description="Command-line client of a kvstore deployment.")
    p.add_argument("--endpoint", "-e", default=None, help=f"daemon HOST:PORT, or a comma list (default $KVSTORE_ENDPOINTS or {DEFAULT_ENDPOINT})")
    p.add_argument("--tenant", default=None, help="tenant (default $KVSTORE_TENANT or 'default')")
    p.add_argument("--subtenant", default=None, help="subtenant (default $KVSTORE_SUBTENANT or 'default')")
    p.add_argument("--token", default=None, help="data token of a daemon run with --auth token (default $KVSTORE_TOKEN)")
    p.add_argument(
        "--admin-token", default=None,
        help="admin token, for stat, ns and token (default $KVSTORE_ADMIN_TOKEN; visible to ps: prefer the variable)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--timeout", type=float, default=None, help=f"seconds per request (default {ClientConfig.timeout:g})")
    p.add_argument("--version", action="version", version=f"kvstore {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    put = sub.add_parser("put", help="store FILE (or - for stdin) under KEY")
    put.add_argument("key")
    put.add_argument("file")
    put.add_argument("--durability", choices=DURABILITIES, default=None, help=f"(default {ClientConfig.default_durability})")

    get = sub.add_parser("get", help="fetch KEY to stdout or -o FILE (exit 1 on a miss)")
    get.add_argument("key")
    get.add_argument("-o", "--output", default=None)

    exists = sub.add_parser("exists", help="which KEYs are stored (exit 1 if any is not)")
    exists.add_argument("keys", nargs="+", metavar="KEY")

    rm = sub.add_parser("rm", help="delete KEYs")
    rm.add_argument("keys", nargs="+", metavar="KEY")

    ls = sub.add_parser("ls", help="list keys and sizes")
    ls.add_argument("--prefix", default="")
    ls.add_argument("--limit", type=int, default=None)

    sub.add_parser("stat", help="daemon statistics: tiers, namespaces, uptime, cluster, rebalancing")

    ns = sub.add_parser("ns", help="namespaces: list, create, drop them, show or set their replication")
    ns_actions = ns.add_subparsers(dest="ns_command", required=True, metavar="ACTION")
    ns_actions.add_parser("ls", help="namespaces with blocks and bytes, over the whole cluster")
    for action, text in (
        ("create", "create a namespace (--auth token: data tokens work only on created ones)"),
        ("drop", "drop a namespace and every block in it, on every node"),
        ("get", "replicas and write quorum of a namespace"),
        ("set", "set them on every node"),
    ):
        one = ns_actions.add_parser(action, help=text)
        one.add_argument("--tenant", default=argparse.SUPPRESS, help="tenant (default: the global --tenant)")
        one.add_argument("--subtenant", default=argparse.SUPPRESS, help="subtenant (default: the global --subtenant)")
        if action == "set":
            one.add_argument("--replicas", type=int, default=None, help="copies of each block (0: the cluster default)")
            one.add_argument("--write-quorum", type=int, default=0, help="replicas a write waits for (default: a majority)")
            one.add_argument("--requests-per-second", type=float, default=None,
                             help="requests each daemon serves the namespace per second (0: unlimited)")
            one.add_argument("--burst", type=int, default=0, help="requests at once within that rate (default: one second's)")

    token = sub.add_parser("token", help="data tokens (--auth token): create, list, revoke")
    token_actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_actions.add_parser("create", help="a new data token, printed once")
    create.add_argument("--tenant", required=True, default=argparse.SUPPRESS, help="the tenant it is for")
    create.add_argument("--subtenant", dest="token_subtenant", default="", help="only this subtenant (default: every subtenant of the tenant)")
    create.add_argument("--read-only", action="store_true", help="reads only (get, exists, lookup, ls, stat)")
    create.add_argument("--description", default="", help="a note shown by token ls")
    listing = token_actions.add_parser("ls", help="data tokens: ids, scope, creation; never secrets")
    listing.add_argument("--tenant", default=argparse.SUPPRESS, help="only this tenant's")
    revoke = token_actions.add_parser("revoke", help="revoke a token on every daemon")
    revoke.add_argument("id", help="the token's id (kvs_<id>_...)")

    add_cluster_parser(sub)
    return p


ADMIN_COMMANDS = ("stat", "ns", "token")


def add_cluster_parser(sub) -> None:
    cluster = sub.add_parser("cluster", help="a local cluster on loopback: up, status, down")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    dir_help = f"the cluster's folder: cluster.json, nodeK/data, nodeK/server.log (default ./{localcluster.DEFAULT_DIR})"

    up = actions.add_parser(
        "up",
        help="start N daemons (and etcd) on 127.0.0.1 in the background",
        usage="kvstore cluster up [options] [-- SERVER_FLAGS...]",
        description="Start N kvstore-server daemons on 127.0.0.1 as background processes and print their "
        "endpoints. On a folder whose cluster is stopped, start it again on the same ports and data; "
        "on a partly running one, start the nodes that are down.",
        epilog="Flags after -- are passed to every kvstore-server (see kvstore-server --help).",
    )
    up.add_argument("--nodes", "-n", type=int, default=None, help=f"daemons (default {localcluster.DEFAULT_NODES})")
    up.add_argument("--etcd", action="store_true", default=None,
                    help="etcd membership: start an etcd (/usr/bin/etcd) too, instead of static --peers")
    up.add_argument("--dir", default=None, help=dir_help)
    up.add_argument("--replicas", type=int, default=None, help="copies of each block (default: the daemon's, 1)")
    up.add_argument("--write-quorum", type=int, default=None, help="replicas that acknowledge a write (default: a majority)")
    up.add_argument("--memory", default=None, help=f"memory tier per daemon (default {localcluster.DEFAULT_MEMORY})")
    up.add_argument("--base-port", type=int, default=None, help="node K listens on BASE_PORT+K-1 (default: free ports)")
    up.add_argument("--wait", type=float, default=60.0, help="seconds to wait for every daemon to answer (default 60)")
    up.add_argument("server_args", nargs="*", metavar="SERVER_FLAGS", help=argparse.SUPPRESS)

    status = actions.add_parser("status", help="health, epoch, blocks and bytes, rebalancing per node (exit 1 unless all up)")
    status.add_argument("--dir", default=None, help=dir_help)
    status.add_argument("--endpoint", "-e", default=argparse.SUPPRESS, help="daemons HOST:PORT[,...] instead of a folder")
    status.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of text")

    down = actions.add_parser("down", help="stop the daemons (and etcd) of a local cluster")
    down.add_argument("--dir", default=None, help=dir_help)
    down.add_argument("--wait", type=float, default=30.0, help="seconds before SIGTERM turns into SIGKILL (default 30)")


def emit(args, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, sort_keys=True))
    elif text:
        print(text)


def run(args, client: SyncClient) -> int:
    cmd = args.command
    if cmd == "put":
        key = parse_key(args.key)
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            try:
                with open(args.file, "rb") as f:
                    data = f.read()
            except OSError as exc:
                print(f"kvstore: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
                return EXIT_ERROR
        client.put(key, data, durability=args.durability)
        emit(args, {"key": show_key(key), "bytes": len(data)}, f"stored {show_key(key)} ({len(data)} bytes)")
        return 0
    if cmd == "get":
        key = parse_key(args.key)
        value = client.get(key)
        if value is None:
            if args.json:
                emit(args, {"key": show_key(key), "found": False}, "")
            print(f"kvstore: {show_key(key)}: not found", file=sys.stderr)
            return EXIT_MISS
        if args.output:
            try:
                with open(args.output, "wb") as f:
                    f.write(value)
            except OSError as exc:
                print(f"kvstore: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
                return EXIT_ERROR
            emit(args, {"key": show_key(key), "found": True, "bytes": len(value), "output": args.output},
                 f"wrote {len(value)} bytes to {args.output}")
        elif args.json:
            emit(args, {"key": show_key(key), "found": True, "bytes": len(value), "value_hex": value.hex()}, "")
        else:
            sys.stdout.buffer.write(value)
            sys.stdout.buffer.flush()
        return 0
    if cmd == "exists":
        keys = [parse_key(k) for k in args.keys]
        present = client.exists(keys)
        emit(args, {show_key(k): p for k, p in zip(keys, present)},
             "\n".join(f"{show_key(k)}\t{'yes' if p else 'no'}" for k, p in zip(keys, present)))
        return 0 if all(present) else EXIT_MISS
    if cmd == "rm":
        keys = [parse_key(k) for k in args.keys]
        deleted = client.delete(keys)
        emit(args, {"deleted": deleted, "requested": len(keys)}, f"deleted {deleted} of {len(keys)}")
        return 0
    if cmd == "ls":
        entries = client.list(parse_key(args.prefix) if args.prefix else b"", limit=args.limit)
        emit(args, [{"key": show_key(k), "bytes": n} for k, n in entries],
             "\n".join(f"{n}\t{show_key(k)}" for k, n in entries))
        return 0
    if cmd == "stat":
        try:
            stats = client.server_stats()
        except PermissionDeniedError:
            if not client.config.token:
                raise
            # A data token: its namespace's figures are all it may see.
            stats = client.stat()
            emit(args, stats, f"{stats['tenant']}/{stats['subtenant']}\t{stats['blocks']} blocks\t"
                              f"{format_size(stats['bytes'])}\t({stats['nodes']} nodes)")
            return 0
        stats["namespace_list"] = client.namespaces()
        emit(args, stats, format_stats(stats))
        return 0
    if cmd == "ns":
        if args.ns_command == "ls":
            entries = client.namespaces()
            emit(args, entries, "\n".join(f"{n['tenant']}/{n['subtenant']}\t{n['blocks']} blocks\t{format_size(n['bytes'])}"
                                          for n in entries))
            return 0
        name = f"{client.config.tenant}/{client.config.subtenant}"
        if args.ns_command == "create":
            created = client.create_namespace()
            emit(args, {"tenant": client.config.tenant, "subtenant": client.config.subtenant, "created": created},
                 f"{name}: {'created' if created else 'exists already'}")
            return 0
        if args.ns_command == "drop":
            dropped = client.drop_namespace()
            emit(args, {"tenant": client.config.tenant, "subtenant": client.config.subtenant, **dropped},
                 f"{name}: dropped ({dropped['blocks']} blocks, {format_size(dropped['bytes'])})")
            return 0
        if args.ns_command == "set" and args.requests_per_second is not None:
            rate = client.set_rate_limit(args.requests_per_second, args.burst)
            if args.replicas is None:
                emit(args, {"tenant": client.config.tenant, "subtenant": client.config.subtenant, **rate},
                     f"{name}: {rate['requests_per_second']:g} requests per second (burst {rate['burst'] or 'one second'})")
                return 0
        if args.ns_command == "set" and args.replicas is None:
            raise KVStoreErrorArg("ns set needs --replicas or --requests-per-second")
        if args.ns_command == "set":
            policy = client.set_replication(args.replicas, args.write_quorum)
        else:
            policy = client.replication()
        emit(args, {"tenant": client.config.tenant, "subtenant": client.config.subtenant, **policy},
             f"{name}: {policy['replicas']} replicas, write quorum {policy['write_quorum']}")
        return 0
    if cmd == "token":
        return run_token(args, client)
    raise AssertionError(cmd)


def run_token(args, client: SyncClient) -> int:
    action = args.token_command
    if action == "create":
        made = client.create_token(args.tenant, args.token_subtenant, read_only=args.read_only, description=args.description)
        scope = f"{made['tenant']}/{made['subtenant'] or '*'}" + (" read-only" if made["read_only"] else "")
        emit(args, made, f"{made['token']}\n(token {made['id']} for {scope}: shown this once, keep it safe)")
        return 0
    if action == "ls":
        listed = client.tokens(args.tenant or "")
        emit(args, listed, "\n".join(
            f"{t['id']}\t{t['tenant']}/{t['subtenant'] or '*'}\t{'read-only' if t['read_only'] else 'read-write'}"
            f"\t{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t['created']))}\t{t['description']}"
            for t in listed
        ))
        return 0
    if action == "revoke":
        client.revoke_token(args.id)
        emit(args, {"id": args.id, "revoked": True}, f"token {args.id} revoked")
        return 0
    raise AssertionError(action)


def format_stats(stats: dict) -> str:
    lines = [
        f"node      {stats['node_id']} at {stats['address']} (kvstore {stats['version']})",
        f"data dir  {stats['data_dir']}",
        f"uptime    {stats['uptime_seconds']:.0f} s, {stats['requests']} requests",
    ]
    for name, tier in stats["tiers"].items():
        lines.append(
            f"{name:<9} {tier['blocks']} blocks, {format_size(tier['bytes'])} of {format_size(tier['capacity_bytes'])}"
            + (
                f" (prefaulting: {format_size(tier['resident_bytes'])} resident)"
                if name == "memory" and tier["resident_bytes"] < tier["capacity_bytes"]
                else ""
            )
        )
    lines.append(f"corrupt   {stats['corrupt_blocks']} blocks dropped; {stats['evictions']} evictions")
    plane = stats.get("data_plane", {})
    if plane.get("enabled"):
        lines.append(f"transfer  zero-copy over UCX (tls {plane['ucx_tls'] or 'UCX default'}), {plane['clients']} clients")
    else:
        lines.append("transfer  inline only (no zero-copy data plane)")
    cluster = stats.get("cluster")
    if cluster:
        lines.append(f"cluster   {cluster['nodes']} nodes ({cluster['membership']}), map epoch {cluster['epoch']}")
    r = stats.get("rebalance")
    if r:
        line = f"rebalance {r['state']}"
        if r["keys_total"] or r["keys_copied"]:
            line += (f": {r['keys_scanned']}/{r['keys_total']} blocks scanned, {r['keys_copied']} copied"
                     f" ({format_size(r['bytes_copied'])}), {r['keys_dropped']} handed off")
        if r["errors"]:
            line += f"; {r['errors']} errors, last: {r['last_error']}"
        lines.append(line)
    lines.append(f"namespaces {stats['namespaces']}")
    for ns in stats.get("namespace_list", []):
        lines.append(f"  {ns['tenant']}/{ns['subtenant']}\t{ns['blocks']} blocks\t{format_size(ns['bytes'])}")
    return "\n".join(lines)


def run_cluster(args) -> int:
    """``kvstore cluster up|status|down``: no client of its own, it talks to each daemon."""
    action = args.cluster_command
    directory = args.dir or localcluster.DEFAULT_DIR
    try:
        if action == "up":
            def started(name: str, pid: int) -> None:
                if not args.json:
                    print(f"started {name} (pid {pid})", file=sys.stderr)

            cluster, names, settled = localcluster.up(
                directory, args.nodes, etcd=args.etcd, replicas=args.replicas, write_quorum=args.write_quorum,
                memory=args.memory, base_port=args.base_port, server_args=args.server_args, wait=args.wait,
                on_start=started,
            )
            if not settled:
                print("kvstore: warning: the daemons do not agree on the cluster map yet; "
                      f"see kvstore cluster status --dir {cluster.dir}", file=sys.stderr)
            emit(args, {**cluster.to_dict(), "started": names, "settled": settled}, format_cluster(cluster))
            return 0
        if action == "down":
            cluster, report = localcluster.down(directory, args.wait)
            emit(args, {"dir": str(cluster.dir), "processes": report},
                 "\n".join(f"{r['name']:<6} pid {r['pid']:<8} {r['result']}" for r in report))
            return 0
        if action == "status":
            endpoint = args.endpoint or (None if args.dir else ClientConfig.environment().get("endpoints"))
            cluster = localcluster.LocalCluster.load(directory)
            if args.endpoint or (cluster is None and endpoint):
                from kvstore.client.config import parse_endpoints

                report = localcluster.status(endpoints=parse_endpoints(endpoint))
            elif cluster is None:
                raise localcluster.ClusterError(
                    f"no cluster in {os.path.abspath(directory)}: give --dir DIR or --endpoint H:P[,...]"
                )
            else:
                report = localcluster.status(cluster)
            emit(args, report, format_cluster_status(report))
            return 0 if report["up"] == report["total"] else EXIT_MISS
    except localcluster.AlreadyRunning as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return EXIT_MISS
    except (HarnessError, KVStoreError) as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return EXIT_ERROR
    raise AssertionError(action)


def format_cluster(cluster: localcluster.LocalCluster) -> str:
    lines = [f"{n.node_id:<8} {n.address:<21} pid {n.pid:<8} {n.data_dir.parent}" for n in cluster.nodes]
    if cluster.etcd is not None:
        lines.append(f"{'etcd':<8} {cluster.etcd.endpoint:<21} pid {cluster.etcd.pid:<8} {cluster.etcd.data_dir.parent}")
    endpoints = ",".join(cluster.endpoints)
    lines += [
        f"{len(cluster.nodes)} nodes up in {cluster.dir} (logs: nodeK/server.log; stop: kvstore cluster down --dir {cluster.dir})",
        endpoints,
        f"export KVSTORE_ENDPOINTS={endpoints}",
    ]
    return "\n".join(lines)


def format_cluster_status(report: dict) -> str:
    epochs = report["epochs"]
    epoch = "epoch " + (str(epochs[0]) if len(epochs) == 1 else "DIFFERS: " + ", ".join(map(str, epochs)) if epochs else "?")
    where = f" in {report['dir']}" if "dir" in report else ""
    lines = [f"{report['up']} of {report['total']} nodes up{where}, {epoch}"]
    if "etcd" in report:
        e = report["etcd"]
        lines.append(f"etcd at {e['endpoint']} (pid {e['pid']}): {e['health']}")
    header = ("NODE", "ADDRESS", "HEALTH", "EPOCH", "MEMBERS", "MEMORY", "DISK", "DATA PLANE", "REBALANCE")
    rows = [header]
    for n in report["nodes"]:
        if n["health"] != "up":
            rows.append((n["id"], n["address"], "down", "-", "-", "-", "-", "-", n.get("error") or ""))
            continue
        tiers = n.get("tiers", {})

        def tier(name: str) -> str:
            t = tiers.get(name)
            return f"{t['blocks']} / {format_size(t['bytes'])}" if t else "-"

        plane = n.get("data_plane", {})
        r = n.get("rebalance")
        if not r:
            rebalance = "-"
        elif r["state"] == "idle" and not r["keys_total"]:
            rebalance = "idle"
        else:
            rebalance = (f"{r['state']} {r['keys_scanned']}/{r['keys_total']} scanned, "
                         f"{r['keys_copied']} copied ({format_size(r['bytes_copied'])})")
            if r["errors"]:
                rebalance += f", {r['errors']} errors: {r['last_error']}"
        rows.append((
            n["id"], n["address"], "up", str(n.get("epoch", "?")), str(len(n.get("members", ()))) if "members" in n else "?",
            tier("memory"), tier("disk"),
            f"ucx({plane['ucx_tls'] or 'default'})" if plane.get("enabled") else "inline",
            rebalance + (f" [{n['error']}]" if n.get("error") else ""),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "cluster":
        return run_cluster(args)
    settings = {"endpoints": args.endpoint, "tenant": args.tenant, "subtenant": args.subtenant, "token": args.token}
    if args.command in ADMIN_COMMANDS:
        admin_token = args.admin_token or os.environ.get("KVSTORE_ADMIN_TOKEN")
        if admin_token:
            settings["token"] = admin_token
    if args.timeout is not None:
        settings["timeout"] = args.timeout
    if "transport" not in ClientConfig.environment():
        # One-shot commands: registering a staging pool would cost more than it saves.
        settings["transport"] = "inline"
    try:
        client = SyncClient(**settings)
    except KVStoreError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return run(args, client)
    except KVStoreErrorArg as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KVStoreError as exc:
        if args.json:
            print(json.dumps({"error": type(exc).__name__, "code": exc.code, "message": exc.message}))
        print(f"kvstore: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
