"""``ServerConfig``: every setting of a kvstore-server process, validated at load.

Precedence: command-line flags, then ``KVSTORE_*`` environment variables
(``KVSTORE_LISTEN``, ``KVSTORE_MEMORY`` ...), then the YAML file given by
``--config``/``KVSTORE_CONFIG``, then the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kvstore.durability import DEFAULT as DEFAULT_DURABILITY
from kvstore.durability import NAMES as DURABILITIES
from kvstore.errors import ConfigError
from kvstore.settings import merge_layers, size_field
from kvstore.units import parse_address, parse_size

DEFAULT_LISTEN = "127.0.0.1:7600"
DEFAULT_DATA_DIR = "./kvstore-data"
DEFAULT_MEMORY = 1 << 30
DEFAULT_MAX_VALUE = 256 << 20


@dataclass(frozen=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: str = DEFAULT_DATA_DIR
    # Memory-tier arena capacity; accepts "1GiB", "512MiB" or bytes.
    memory: int = size_field(DEFAULT_MEMORY)
    # Prometheus /metrics port; None disables the endpoint, 0 picks a free port.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    max_value_size: int = size_field(DEFAULT_MAX_VALUE)
    default_durability: str = DEFAULT_DURABILITY.value
    # Segment files roll over at this size (values are appended to segments).
    segment_size: int = size_field(1 << 30)
    # Group commit: how long a sync put may wait for others to share its fsync.
    sync_window_ms: float = 0.5
    # How long a "memory" put may wait for its write-back to disk: write-backs
    # wait while puts stream in (until they pause, or this long); 0 writes at once.
    writeback_delay: float = 1.0
    io_threads: int = 4
    # Largest Get response; more keys are answered in follow-up calls.
    max_response_bytes: int = size_field(64 << 20)
    drain_seconds: float = 10.0
    # Name in the cluster; empty means HOSTNAME-PORT once the port is bound.
    node_id: str = ""
    # Address clients and peers dial; empty means the bound listen address.
    advertise: str = ""
    # Static membership: "id1=host:port,id2=host:port[@weight]" (this daemon included or not).
    peers: str = ""
    # Dynamic membership: etcd endpoints "host:port[,...]"; members register under a lease.
    etcd: str = ""
    etcd_prefix: str = "/kvstore/default"
    etcd_ttl: float = 10.0
    # Cluster-wide replication default; namespaces may override it.
    replicas: int = 1
    # Acknowledge a write once this many replicas hold it; 0 means a majority.
    write_quorum: int = 0
    # Virtual nodes per unit weight on the ring; 0 means the ring's default.
    vnodes: int = 0
    # Bandwidth the background rebalancer may use, bytes per second.
    rebalance_rate: int = size_field(256 << 20)
    # Seconds between anti-entropy passes (a membership change starts one at once).
    rebalance_interval: float = 30.0
    # Zero-copy data plane over UCX; off means values travel inline only.
    data_plane: bool = True
    # UCX transports, e.g. "shm,tcp", "tcp", "all"; empty means UCX's default choice.
    ucx_tls: str = ""
    # Serve the Data service to clients on this host over a Unix socket too (data plane only).
    local_channel: bool = True
    # Data-plane sessions (one per client that said Hello) held at once; past it the
    # least recently used is closed (its client says Hello again when it next needs it).
    max_sessions: int = 4096
    # Seconds a data-plane session may go unused before it is closed.
    session_idle: float = 600.0
    # Sessions one client (one credential from one host) may hold; past it its own oldest closes.
    sessions_per_client: int = 64
    # Bytes of inline get values held in flight (read, not yet sent): daemon-wide,
    # per tenant and per client connection; a get beyond them is answered in part.
    in_flight_bytes: int = size_field(2 << 30)
    tenant_in_flight_bytes: int = size_field(1 << 30)
    connection_in_flight_bytes: int = size_field(512 << 20)
    # Data calls of one tenant served at once; beyond it RESOURCE_EXHAUSTED (TOO_MANY_IN_FLIGHT).
    tenant_requests: int = 2048
    # Concurrent calls per gRPC connection (HTTP/2 streams; more wait in the client).
    connection_streams: int = 128
    # gRPC connections held at once; more are closed as they arrive.
    max_connections: int = 4096
    # Seconds before an idle gRPC connection is closed (its client reconnects when it
    # needs to); silent ones (no answer to keepalive pings) go within a minute.
    connection_idle: float = 300.0
    # "open": anyone may do anything, namespaces come into being on first use;
    # "token": every call presents a token, namespaces exist once an admin created them.
    auth: str = "open"
    # The admin credential: the first line of this file, or KVSTORE_ADMIN_TOKEN.
    admin_token_file: str = ""
    admin_token: str = field(default="", repr=False)
    # TLS on gRPC: this daemon's certificate chain and key (PEM); with
    # tls_client_ca, clients (and peers) must present a certificate it signed.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # CA bundle that verifies the other daemons' certificates when this one dials
    # them (rebalancing, table sync); empty: tls_client_ca, else the system's roots.
    tls_ca: str = ""
    # A plaintext port serving only grpc.health.v1 (probes that speak no TLS); empty: none.
    health_listen: str = ""
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in (
            "memory", "max_value_size", "segment_size", "max_response_bytes", "rebalance_rate",
            "in_flight_bytes", "tenant_in_flight_bytes", "connection_in_flight_bytes",
        ):
            try:
                fix(name, parse_size(getattr(self, name)))
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        try:
            parse_address(self.listen)
        except ValueError as exc:
            raise ConfigError(f"listen: {exc}") from None
        if not self.data_dir:
            raise ConfigError("data_dir: must not be empty")
        if self.memory < (1 << 20):
            raise ConfigError(f"memory: {self.memory} bytes is below the 1 MiB minimum")
        if not 1 <= self.max_value_size <= (2 << 30) - (1 << 20):
            raise ConfigError(f"max_value_size: {self.max_value_size} must be between 1 byte and 2 GiB - 1 MiB")
        if self.segment_size < (1 << 20):
            raise ConfigError("segment_size: must be at least 1 MiB")
        if self.metrics_port is not None and not 0 <= int(self.metrics_port) <= 65535:
            raise ConfigError(f"metrics_port: {self.metrics_port} is not a port number")
        if self.default_durability not in DURABILITIES:
            raise ConfigError(f"default_durability: {self.default_durability!r} is not one of {', '.join(DURABILITIES)}")
        if self.io_threads < 1:
            raise ConfigError("io_threads: must be at least 1")
        if self.writeback_delay < 0:
            raise ConfigError("writeback_delay: must not be negative")
        if self.sync_window_ms < 0:
            raise ConfigError("sync_window_ms: must not be negative")
        if self.drain_seconds < 0:
            raise ConfigError("drain_seconds: must not be negative")
        if self.replicas < 1:
            raise ConfigError(f"replicas: {self.replicas} must be at least 1")
        if not 0 <= self.write_quorum <= self.replicas:
            raise ConfigError(f"write_quorum: {self.write_quorum} must be between 1 and replicas ({self.replicas}), or 0 for a majority")
        if self.vnodes < 0:
            raise ConfigError("vnodes: must not be negative")
        if self.rebalance_rate < 1:
            raise ConfigError("rebalance_rate: must be positive")
        if self.rebalance_interval <= 0:
            raise ConfigError("rebalance_interval: must be positive")
        if self.peers and self.etcd:
            raise ConfigError("peers and etcd: choose static peers or etcd membership, not both")
        if self.peers:
            from kvstore.server.cluster.membership import parse_peers

            parse_peers(self.peers)
        for name, value in [("advertise", self.advertise)] + [("etcd", e) for e in self.etcd_endpoints]:
            if value:
                try:
                    parse_address(value)
                except ValueError as exc:
                    raise ConfigError(f"{name}: {exc}") from None
        if self.max_sessions < 1:
            raise ConfigError("max_sessions: must be at least 1")
        if self.sessions_per_client < 1:
            raise ConfigError("sessions_per_client: must be at least 1")
        if self.session_idle <= 0:
            raise ConfigError("session_idle: must be positive")
        if self.etcd_ttl < 1:
            raise ConfigError("etcd_ttl: must be at least 1 second")
        for name in ("in_flight_bytes", "tenant_in_flight_bytes", "connection_in_flight_bytes", "tenant_requests",
                     "connection_streams", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be positive")
        if self.connection_idle <= 0:
            raise ConfigError("connection_idle: must be positive")
        self._check_security(fix)
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level: {self.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
        fix("log_level", self.log_level.upper())

    def _check_security(self, fix) -> None:
        from kvstore.server.auth.guard import MODES
        from kvstore.server.auth.tokens import MIN_ADMIN_TOKEN_CHARS, PEER_PREFIX, PREFIX

        if self.auth not in MODES:
            raise ConfigError(f"auth: {self.auth!r} is not one of {', '.join(MODES)}")
        if self.admin_token_file:
            try:
                lines = Path(self.admin_token_file).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"admin_token_file: cannot read {self.admin_token_file}: {exc.strerror}") from None
            fix("admin_token", lines[0].strip() if lines else "")
        token = self.admin_token
        if token and (len(token) < MIN_ADMIN_TOKEN_CHARS or token.startswith((PREFIX, PEER_PREFIX)) or not token.isprintable()):
            raise ConfigError(
                f"admin token: use at least {MIN_ADMIN_TOKEN_CHARS} printable characters, not starting with "
                f"{PREFIX!r} (e.g. the output of 'openssl rand -hex 32')"
            )
        if self.auth == "token" and not token:
            raise ConfigError("auth token needs the admin credential: --admin-token-file PATH or KVSTORE_ADMIN_TOKEN")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key: give both (the certificate chain and its private key) or neither")
        if (self.tls_client_ca or self.tls_ca) and not self.tls_cert:
            raise ConfigError("tls_client_ca and tls_ca need tls_cert and tls_key: mutual TLS is TLS first")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "tls_ca"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{name}: cannot read {path}")
        if self.health_listen:
            try:
                parse_address(self.health_listen)
            except ValueError as exc:
                raise ConfigError(f"health_listen: {exc}") from None

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def etcd_endpoints(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.etcd.split(",") if part.strip())

    @property
    def max_message_bytes(self) -> int:
        """gRPC message limit: one maximal value plus room for keys and framing."""
        return max(self.max_value_size, self.max_response_bytes) + (4 << 20)

    @classmethod
    def load(
        cls,
        args: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        config_file: str | os.PathLike | None = None,
    ) -> "ServerConfig":
        return merge_layers(cls, args=args or {}, environ=environ, file=config_file and str(config_file))

    def replace(self, **changes: Any) -> "ServerConfig":
        return dataclasses.replace(self, **changes)
