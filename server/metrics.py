"""Prometheus metrics of one daemon, in a registry of its own (several daemons
may share a process in tests), served on ``--metrics-port`` when set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kvstore_requests", "RPCs handled, by method and status", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "kvstore_request_seconds",
            "Latency of successful RPCs",
            ["method"],
            registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.bytes_in = Counter("kvstore_put_bytes", "Value bytes stored by puts", registry=r)
        self.bytes_out = Counter("kvstore_get_bytes", "Value bytes returned by gets", registry=r)
        self.blocks_put = Counter("kvstore_put_blocks", "Blocks stored by puts", registry=r)
        self.gets = Counter("kvstore_get_blocks", "Blocks asked for by gets, by result", ["result"], registry=r)
        self.corrupt = Gauge("kvstore_corrupt_blocks", "Blocks dropped because they failed their checksum", registry=r)
        self.tier_blocks = Gauge("kvstore_tier_blocks", "Blocks held per tier", ["tier"], registry=r)
        self.tier_bytes = Gauge("kvstore_tier_bytes", "Bytes held per tier", ["tier"], registry=r)
        self.tier_capacity = Gauge("kvstore_tier_capacity_bytes", "Capacity per tier", ["tier"], registry=r)
        self.evictions = Gauge("kvstore_memory_evictions", "Blocks evicted from the memory tier", registry=r)
        self.namespaces = Gauge("kvstore_namespaces", "Namespaces known to this daemon", registry=r)
        self.cluster_nodes = Gauge("kvstore_cluster_nodes", "Members of the cluster map", registry=r)
        self.rebalance_running = Gauge("kvstore_rebalance_running", "1 while a rebalance pass runs", registry=r)
        self.rebalance_scanned = Gauge("kvstore_rebalance_keys_scanned", "Blocks walked by the current pass", registry=r)
        self.rebalance_total = Gauge("kvstore_rebalance_keys_total", "Blocks the current pass walks", registry=r)
        self.rebalance_copied = Gauge("kvstore_rebalance_keys_copied", "Blocks copied to their owners", registry=r)
        self.rebalance_bytes = Gauge("kvstore_rebalance_bytes_copied", "Bytes copied to owners", registry=r)
        self.rebalance_dropped = Gauge("kvstore_rebalance_keys_dropped", "Local copies dropped after owners confirmed", registry=r)
        self.local_connections = Gauge(
            "kvstore_local_channel_connections", "Clients connected over the local channel (Unix socket)", registry=r
        )
        self.local_in_flight = Gauge(
            "kvstore_local_channel_calls_in_flight", "Local-channel calls being served", registry=r
        )
        self.auth_denied = Counter(
            "kvstore_auth_denied",
            "Calls refused for their credential, by method and code (UNAUTHENTICATED, PERMISSION_DENIED ...)",
            ["method", "code"],
            registry=r,
        )
        self.grpc_restarts = Counter(
            "kvstore_grpc_server_restarts", "Times the gRPC server died under the daemon and was started again", registry=r
        )
        self.rate_limited = Counter(
            "kvstore_rate_limited", "Calls refused by a namespace's request rate or an in-flight bound, by code",
            ["code"], registry=r,
        )
        # Requests being served over every transport; the data plane reads it to
        # know whether anything else waits for the event loop.
        self.requests_in_flight = 0
        Gauge(
            "kvstore_requests_in_flight", "RPCs being served (gRPC and the local channel)", registry=r
        ).set_function(lambda: self.requests_in_flight)
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
