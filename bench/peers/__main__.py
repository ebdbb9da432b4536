"""``python -m bench.peers``: the self-test of every peer (or ``--peers redis,mooncake-shm``)."""

from __future__ import annotations

import argparse
import sys

from bench.peers import ALL_PEERS, available_peers, selftest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--peers", default=",".join(ALL_PEERS), help=f"comma-separated, of {', '.join(ALL_PEERS)}")
    ours, rest = p.parse_known_args(argv)
    specs = available_peers([n.strip() for n in ours.peers.split(",") if n.strip()])
    return selftest([(s.name, s.factory, s.reason) for s in specs], rest)


if __name__ == "__main__":
    sys.exit(main())
