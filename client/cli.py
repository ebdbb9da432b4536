"""``kvstore``: the command-line client.

    kvstore [--endpoint H:P] [--tenant T] [--subtenant S] [--json] COMMAND ...
      put KEY FILE|-          store a file (or stdin) under KEY
      get KEY [-o FILE]       write a block to stdout or FILE; exit 1 on a miss
      exists KEY...           print which keys are stored; exit 1 if any is not
      rm KEY...               delete blocks; print how many existed
      ls [--prefix P]         list keys with their sizes
      stat                    blocks and bytes per tier, namespaces, uptime

Keys are given as text and stored as their UTF-8 bytes; prefix one with
``hex:`` to give raw bytes (``hex:00ff``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kvstore import __version__
from kvstore.client.config import DEFAULT_ENDPOINT
from kvstore.client.sync import SyncClient
from kvstore.errors import KVStoreError
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
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--timeout", type=float, default=None, help="seconds per request (default 60)")
    p.add_argument("--version", action="version", version=f"kvstore {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    put = sub.add_parser("put", help="store FILE (or - for stdin) under KEY")
    put.add_argument("key")
    put.add_argument("file")
    put.add_argument("--durability", choices=("memory", "disk", "sync"), default=None)

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

    sub.add_parser("stat", help="daemon statistics: tiers, namespaces, uptime")
    return p


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
        stats = client.server_stats()
        stats["namespace_list"] = client.namespaces()
        emit(args, stats, format_stats(stats))
        return 0
    raise AssertionError(cmd)


def format_stats(stats: dict) -> str:
    lines = [
        f"node      {stats['node_id']} at {stats['address']} (kvstore {stats['version']})",
        f"data dir  {stats['data_dir']}",
        f"uptime    {stats['uptime_seconds']:.0f} s, {stats['requests']} requests",
    ]
    for name, tier in stats["tiers"].items():
        lines.append(
            f"{name:<9} {tier['blocks']} blocks, {format_size(tier['bytes'])} of {format_size(tier['capacity_bytes'])}"
        )
    lines.append(f"corrupt   {stats['corrupt_blocks']} blocks dropped; {stats['evictions']} evictions")
    plane = stats.get("data_plane", {})
    if plane.get("enabled"):
        lines.append(f"transfer  zero-copy over UCX (tls {plane['ucx_tls'] or 'UCX default'}), {plane['clients']} clients")
    else:
        lines.append("transfer  inline only (no zero-copy data plane)")
    lines.append(f"namespaces {stats['namespaces']}")
    for ns in stats.get("namespace_list", []):
        lines.append(f"  {ns['tenant']}/{ns['subtenant']}\t{ns['blocks']} blocks\t{format_size(ns['bytes'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = {"endpoints": args.endpoint, "tenant": args.tenant, "subtenant": args.subtenant}
    if args.timeout is not None:
        settings["timeout"] = args.timeout
    if "KVSTORE_TRANSPORT" not in os.environ:
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
