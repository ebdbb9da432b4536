"""``kvstore-server``: run one daemon until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from kvstore import __version__
from kvstore.durability import NAMES as DURABILITIES
from kvstore.errors import KVStoreError
from kvstore.server.config import ServerConfig
from kvstore.units import format_size


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()  # the defaults, kept in one place: the help reads them

    def size(value: int) -> str:
        return format_size(value).replace(".0 ", " ").replace(" ", "")

    p = argparse.ArgumentParser(
        prog="kvstore-server",
        description="Serve KV-cache blocks: a memory tier over durable RocksDB-indexed storage.",
        epilog="Every flag can also be set as KVSTORE_<NAME> (e.g. KVSTORE_MEMORY=4GiB) or in the --config YAML file.",
    )
    p.add_argument("--listen", help=f"gRPC address HOST:PORT (default {d.listen}; port 0 picks one)")
    p.add_argument("--data-dir", help=f"directory for persisted blocks (default {d.data_dir})")
    p.add_argument("--memory", help=f"memory-tier capacity, e.g. 1GiB (default {size(d.memory)})")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default off)")
    p.add_argument("--metrics-host", help=f"address for /metrics (default {d.metrics_host})")
    p.add_argument("--max-value-size", help=f"largest block accepted (default {size(d.max_value_size)})")
    p.add_argument(
        "--default-durability", choices=DURABILITIES, help=f"durability of puts that name none (default {d.default_durability})"
    )
    p.add_argument("--node-id", help="this daemon's name in the cluster (default HOSTNAME-PORT)")
    p.add_argument("--advertise", help="HOST:PORT clients and peers dial (default: the listen address)")
    p.add_argument("--peers", help="static cluster: id1=host:port,id2=host:port[@weight],... (default: a cluster of one)")
    p.add_argument("--etcd", help="dynamic cluster: etcd endpoints HOST:PORT[,...]")
    p.add_argument("--etcd-prefix", help=f"etcd key prefix of this cluster (default {d.etcd_prefix})")
    p.add_argument("--etcd-ttl", type=float, help=f"membership lease TTL in seconds (default {d.etcd_ttl:g})")
    p.add_argument("--replicas", type=int, help=f"copies of each block, cluster default (default {d.replicas})")
    p.add_argument("--write-quorum", type=int, help="replicas that must hold a write before it is acknowledged (default: a majority)")
    p.add_argument("--vnodes", type=int, help="virtual nodes per unit weight on the ring")
    p.add_argument("--rebalance-rate", help=f"bandwidth for moving blocks after membership changes (default {size(d.rebalance_rate)} per second)")
    p.add_argument("--rebalance-interval", type=float, help=f"seconds between anti-entropy passes (default {d.rebalance_interval:g})")
    p.add_argument(
        "--writeback-delay", type=float,
        help=f'seconds a "memory" put may wait for its write-back to disk while puts stream in (default {d.writeback_delay:g}; 0: at once)',
    )
    p.add_argument("--io-threads", type=int, help=f"threads for disk and copy work (default {d.io_threads})")
    p.add_argument("--drain-seconds", type=float, help=f"how long SIGTERM waits for in-flight requests (default {d.drain_seconds:g})")
    p.add_argument("--ucx-tls", help='UCX transports of the data plane, e.g. "shm,tcp", "tcp", "all" (default: UCX chooses)')
    p.add_argument(
        "--max-sessions", type=int,
        help=f"data-plane sessions held at once; past it the least recently used closes (default {d.max_sessions})",
    )
    p.add_argument(
        "--session-idle", type=float, help=f"seconds a data-plane session may go unused (default {d.session_idle:g})"
    )
    p.add_argument(
        "--sessions-per-client", type=int,
        help=f"data-plane sessions one credential may hold from one host (default {d.sessions_per_client})",
    )
    p.add_argument("--no-data-plane", dest="data_plane", action="store_const", const=False, help="serve inline values only")
    p.add_argument(
        "--no-local-channel", dest="local_channel", action="store_const", const=False,
        help="co-located clients send Data calls over gRPC too (not over the daemon's Unix socket)",
    )
    p.add_argument(
        "--in-flight-bytes", help=f"inline get bytes held at once, daemon-wide (default {size(d.in_flight_bytes)})"
    )
    p.add_argument("--tenant-in-flight-bytes", help=f"... per tenant (default {size(d.tenant_in_flight_bytes)})")
    p.add_argument("--connection-in-flight-bytes", help=f"... per client connection (default {size(d.connection_in_flight_bytes)})")
    p.add_argument("--tenant-requests", type=int, help=f"Data calls of one tenant served at once (default {d.tenant_requests})")
    p.add_argument("--connection-streams", type=int, help=f"concurrent calls per gRPC connection (default {d.connection_streams})")
    p.add_argument("--max-connections", type=int, help=f"gRPC connections held at once (default {d.max_connections})")
    p.add_argument("--connection-idle", type=float, help=f"seconds before an idle connection closes (default {d.connection_idle:g})")
    p.add_argument(
        "--auth", choices=("open", "token"),
        help=f"open: no credentials, namespaces on first use; token: a token on every call, namespaces created by an admin (default {d.auth})",
    )
    p.add_argument(
        "--admin-token-file", help="file whose first line is the admin token (or set KVSTORE_ADMIN_TOKEN); needed by --auth token"
    )
    p.add_argument("--tls-cert", help="TLS on gRPC: this daemon's certificate chain (PEM)")
    p.add_argument("--tls-key", help="TLS on gRPC: the certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", help="mutual TLS: clients and peers must present a certificate this CA signed")
    p.add_argument("--tls-ca", help="CA that verifies the other daemons' certificates (default: --tls-client-ca, else the system's)")
    p.add_argument(
        "--health-listen", help="HOST:PORT serving only the plaintext gRPC health service, for probes when TLS is on (default none)"
    )
    p.add_argument("--log-level", help=f"DEBUG, INFO, WARNING or ERROR (default {d.log_level})")
    p.add_argument("--config", help="YAML file of settings (keys as the flags, with underscores)")
    p.add_argument("--version", action="version", version=f"kvstore-server {__version__}")
    return p


def load_config(argv: list[str] | None = None) -> ServerConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    return ServerConfig.load(args, config_file=config_file)


async def serve(config: ServerConfig) -> None:
    from kvstore.server.daemon import Daemon

    # Handlers first: a SIGTERM that arrives as soon as the daemon says it is
    # listening must drain it, not kill it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = await Daemon(config).start()
    await stop.wait()
    logging.getLogger("kvstore.server").info("draining (up to %.1fs)", config.drain_seconds)
    await daemon.stop()
    logging.getLogger("kvstore.server").info("stopped")


def raise_file_limit() -> None:
    """Connections, sessions and segment files each take a descriptor: allow as many as the hard limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def tune_allocator() -> None:
    """Keep large buffers on glibc's heap instead of fresh mmaps.

    Every inline value arrives in a new multi-MiB buffer; above glibc's default
    threshold each is a fresh mapping whose pages fault in on first touch and
    are unmapped on free, which can cost more than the copy itself.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 512 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


SERVER_MODULES = ("rocksdict", "grpc_health", "grpc_reflection", "prometheus_client", "aetcd")


def missing_server_modules() -> list[str]:
    """The daemon's dependencies (the ``server`` extra) that this environment lacks."""
    import importlib.util

    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    missing = missing_server_modules()
    if missing:
        print(
            f"kvstore-server: this environment has the kvstore SDK but not the daemon's dependencies "
            f"({', '.join(missing)}): pip install 'kvstore[server]'",
            file=sys.stderr,
        )
        return 2
    try:
        config = load_config(argv)
    except KVStoreError as exc:
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 2
    tune_allocator()
    raise_file_limit()
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(serve(config))
        # Drained and stopped: closing the loop restored the default handlers, so a
        # second SIGTERM during interpreter teardown would turn a clean exit into -15.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    except KVStoreError as exc:
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
