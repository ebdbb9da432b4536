"""``ClientConfig`` and ``RetryPolicy``: every setting of an SDK client.

Precedence: keyword arguments to ``Client``, then ``KVSTORE_*`` environment
variables (``KVSTORE_ENDPOINTS``, ``KVSTORE_TENANT``, ``KVSTORE_TIMEOUT`` ...),
then the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from kvstore.backoff import Backoff
from kvstore.durability import DEFAULT as DEFAULT_DURABILITY
from kvstore.durability import NAMES as DURABILITIES
from kvstore.errors import ConfigError
from kvstore.namespace import DEFAULT_SUBTENANT, DEFAULT_TENANT, validate_name
from kvstore.settings import merge_layers, read_env, size_field
from kvstore.units import parse_address

DEFAULT_ENDPOINT = "127.0.0.1:7600"
TRANSPORTS = ("auto", "ucx", "inline")


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[str, ...]:
    """("host:port", ...) from "h:p", "h1:p1,h2:p2" or a list of those."""
    if isinstance(endpoints, str):
        items = endpoints.split(",")
    else:
        items = [part for item in endpoints for part in str(item).split(",")]
    parsed = tuple(item.strip() for item in items if item.strip())
    if not parsed:
        raise ConfigError("endpoints: give at least one HOST:PORT")
    for item in parsed:
        try:
            parse_address(item)
        except ValueError as exc:
            raise ConfigError(f"endpoints: {exc}") from None
    return parsed


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is retried on a retryable error.

    Defaults fit an inference engine: a couple of quick retries, then the
    error (or a miss) rather than a stalled batch.
    """

    attempts: int = 3
    backoff: float = 0.02  # seconds before the second attempt
    multiplier: float = 4.0
    max_backoff: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError("retry.attempts: must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ConfigError("retry: backoff values must be non-negative and multiplier at least 1")
        object.__setattr__(self, "_delays", Backoff(self.backoff, self.multiplier, self.max_backoff))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (1-based; attempt 1 waits 0)."""
        return 0.0 if attempt <= 1 else self._delays.delay(attempt - 2)


@dataclass(frozen=True)
class Deadline:
    """How long one SDK call may take.

    ``total`` bounds the whole call, every replica and retry included;
    ``attempt`` bounds one RPC to one daemon: when it runs out (a frozen or
    partitioned daemon) the request moves on to the next replica.
    """

    total: float = 60.0
    attempt: float = 5.0

    def __post_init__(self) -> None:
        if not (self.total > 0 and self.attempt > 0):
            raise ConfigError("deadline: total and attempt must be positive seconds")


@dataclass(frozen=True)
class ClientConfig:
    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    tenant: str = DEFAULT_TENANT
    subtenant: str = DEFAULT_SUBTENANT
    # Deadline of one SDK call, in seconds, every replica and retry included.
    timeout: float = 60.0
    # Deadline of one RPC to one daemon; past it the call moves to the next replica.
    attempt_timeout: float = 5.0
    # Reads that no replica could serve in time: "miss" (None, like an absent
    # block: an engine recomputes rather than stalls) or "raise".
    read_failures: str = "miss"
    # How often the cluster map is re-read from a daemon, in seconds.
    map_refresh: float = 5.0
    connect_timeout: float = 5.0
    default_durability: str = DEFAULT_DURABILITY.value
    # Bounds of one RPC; bigger batches are split by the SDK.
    max_batch_keys: int = 1024
    max_batch_bytes: int = size_field(32 << 20)
    # How many RPCs of one split batch run at once.
    concurrency: int = 4
    verify_checksums: bool = True
    # "auto": zero-copy UCX data plane when both sides have it, inline otherwise;
    # "ucx": require it; "inline": values always travel inside gRPC messages.
    transport: str = "auto"
    # UCX transports, e.g. "shm,tcp", "tcp", "all"; empty means UCX's default choice.
    ucx_tls: str = ""
    # Data calls to a daemon on this host over its local channel (a Unix socket)
    # instead of gRPC, when shared memory is allowed (see ucx_tls) and the daemon offers one.
    local_channel: bool = True
    # Registered buffer that plain put/get copy through on the zero-copy path.
    staging_bytes: int = size_field(128 << 20)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # The data token ("kvs_<id>_<secret>") of a daemon run with --auth token; KVSTORE_TOKEN.
    token: str = field(default="", repr=False)
    # TLS to the daemons: "" off; True (or "system") verifies them with the system's
    # roots; a path, with that CA bundle (PEM).
    tls: str = ""
    # Mutual TLS: this client's certificate chain and key (PEM).
    tls_cert: str = ""
    tls_key: str = ""
    # The name the daemons' certificates are checked against, when it is not the endpoint's host.
    tls_server_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", parse_endpoints(self.endpoints))
        validate_name("tenant", self.tenant)
        validate_name("subtenant", self.subtenant)
        if self.timeout <= 0 or self.connect_timeout <= 0 or self.attempt_timeout <= 0:
            raise ConfigError("timeout, attempt_timeout and connect_timeout must be positive")
        if self.read_failures not in ("miss", "raise"):
            raise ConfigError(f"read_failures: {self.read_failures!r} is not 'miss' or 'raise'")
        if self.map_refresh <= 0:
            raise ConfigError("map_refresh: must be positive")
        if self.default_durability not in DURABILITIES:
            raise ConfigError(f"default_durability: {self.default_durability!r} is not one of {', '.join(DURABILITIES)}")
        if self.max_batch_keys < 1 or self.max_batch_bytes < 1:
            raise ConfigError("max_batch_keys and max_batch_bytes must be positive")
        if self.concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport: {self.transport!r} is not one of {', '.join(TRANSPORTS)}")
        if self.staging_bytes < (1 << 20):
            raise ConfigError("staging_bytes: must be at least 1 MiB")
        self._check_tls()

    def _check_tls(self) -> None:
        tls = self.tls
        if tls is True or (isinstance(tls, str) and tls.lower() in ("true", "1", "yes", "on")):
            tls = "system"
        elif tls is False or tls is None or (isinstance(tls, str) and tls.lower() in ("false", "0", "no", "off")):
            tls = ""
        object.__setattr__(self, "tls", str(tls))
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key: give both (a client certificate and its key) or neither")
        if self.tls_cert and not self.tls:
            raise ConfigError("tls_cert: a client certificate needs tls (True, or the daemons' CA bundle)")
        for name in ("tls_cert", "tls_key") + (("tls",) if self.tls not in ("", "system") else ()):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{name}: cannot read {path}")

    def channel_credentials(self):
        """grpc.ChannelCredentials of the TLS settings, or None for plaintext."""
        if not self.tls:
            return None
        import grpc

        def read(path: str) -> bytes | None:
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(
            root_certificates=None if self.tls == "system" else read(self.tls),
            private_key=read(self.tls_key) if self.tls_key else None,
            certificate_chain=read(self.tls_cert) if self.tls_cert else None,
        )

    @classmethod
    def load(cls, args: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None) -> "ClientConfig":
        return merge_layers(cls, args=args or {}, environ=environ if environ is not None else os.environ, file=None)

    @classmethod
    def environment(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The settings the ``KVSTORE_*`` environment gives, by field name (unparsed)."""
        return read_env({f.name for f in dataclasses.fields(cls)}, environ)

    @property
    def deadline(self) -> Deadline:
        return Deadline(self.timeout, min(self.attempt_timeout, self.timeout))

    def replace(self, **changes: Any) -> "ClientConfig":
        return dataclasses.replace(self, **changes)
