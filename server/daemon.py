"""One kvstore daemon: storage, gRPC services, health, reflection and metrics,
started and drained as a unit. ``main.py`` runs it as a process; tests run it
in-process on port 0."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore._proto.v1 import admin_pb2, cluster_pb2, data_pb2
from kvstore.errors import ConfigError, KVStoreError
from kvstore.namespace import Namespace
from kvstore.replication import Replication
from kvstore.ring import DEFAULT_VNODES
from kvstore.server import tls
from kvstore.server.admission import Admission
from kvstore.server.auth.guard import Guard
from kvstore.server.auth.sync import AuthSync
from kvstore.server.auth.table import AuthTable
from kvstore.server.auth.tokens import peer_credential
from kvstore.server.cluster.membership import Member, MemberList, Membership, StaticMembership, parse_peers
from kvstore.server.cluster.peers import Peers
from kvstore.server.cluster.rebalance import Rebalancer
from kvstore.server.cluster.state import ClusterState
from kvstore.server.config import ServerConfig
from kvstore.server.dataplane import DataPlane
from kvstore.server.metrics import Metrics
from kvstore.server.rpc.admin import AdminService
from kvstore.server.rpc.cluster import ClusterService
from kvstore.server.rpc.data import DataService
from kvstore.server.rpc.local import LocalServer, socket_name
from kvstore.server.storage.store import BlockStore
from kvstore.units import format_size, parse_address

log = logging.getLogger("kvstore.server")

SERVICE_NAMES = (
    data_pb2.DESCRIPTOR.services_by_name["Data"].full_name,
    cluster_pb2.DESCRIPTOR.services_by_name["Cluster"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    limit = config.max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        # One connection's calls at once: the rest wait in its client, not in this daemon.
        ("grpc.max_concurrent_streams", config.connection_streams),
        # Past this many connections new ones are closed at once: a flood cannot take every descriptor.
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        # A connection that never completes its TLS/HTTP/2 handshake is dropped after 10 s ...
        ("grpc.server_handshake_timeout_ms", 10_000),
        # ... one that answers no ping within 20 s (half-open, or a silent peer) after at most 50 s ...
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # ... and an idle one after connection_idle (clients reconnect on their next call).
        ("grpc.max_connection_idle_ms", int(config.connection_idle * 1000)),
        # Clients' own keepalive pings are welcome, also between calls.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def listen(server: grpc.aio.Server, address: str, credentials, setting: str = "listen") -> int:
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"{setting}: cannot bind {address}: {exc}") from None


class Daemon:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store: BlockStore | None = None
        self.dataplane: DataPlane | None = None
        self.server: grpc.aio.Server | None = None
        self.membership: Membership | None = None
        self.cluster: ClusterState | None = None
        self.rebalancer: Rebalancer | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        # Serve the Data service to clients on this host over a Unix socket too
        # (with the data plane only); set before start() to turn it off.
        self.local_channel: bool = config.local_channel
        self.local: LocalServer | None = None
        self.data: DataService | None = None
        self.guard: Guard | None = None
        self.auth_sync: AuthSync | None = None
        self.peers: Peers | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self._tls = tls.server_credentials(config)
        self._handlers: tuple = ()
        self._guardian: asyncio.Task | None = None
        self._stopping = False

    @property
    def address(self) -> str:
        host, _ = parse_address(self.config.listen)
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> "Daemon":
        config = self.config
        self.store = BlockStore(
            Path(config.data_dir),
            memory_bytes=config.memory,
            segment_size=config.segment_size,
            sync_window=config.sync_window_ms / 1000,
            io_threads=config.io_threads,
            writeback_delay=config.writeback_delay,
        )
        self.store.prefault()
        try:
            self.guard = Guard(config.auth, AuthTable(Path(config.data_dir)), config.admin_token, self.metrics)
        except KVStoreError:
            await self.store.close()
            raise
        self.server = grpc.aio.server(options=server_options(config))
        try:
            self.port = listen(self.server, config.listen, self._tls)
            if config.health_listen:
                # Probes that speak neither TLS nor tokens: this port serves grpc.health.v1 alone.
                self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
                health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
                self.health_port = listen(self.health_server, config.health_listen, None, "health_listen")
        except ConfigError:
            await self.store.close()
            raise
        if not config.node_id:
            config = self.config = config.replace(node_id=f"{socket.gethostname()}-{self.port}")
        self.dataplane = DataPlane(
            self.store.arena_buffer(),
            config.ucx_tls,
            enabled=config.data_plane,
            others_waiting=lambda: self.metrics.requests_in_flight > 1,
            max_sessions=config.max_sessions,
            session_idle=config.session_idle,
            sessions_per_client=config.sessions_per_client,
        )
        if not self.dataplane.enabled:
            log.info("zero-copy data plane off: %s", self.dataplane.reason)
        self.dataplane.start()
        self.peers = Peers(
            config.max_message_bytes,
            credential=peer_credential(config.admin_token) if config.admin_token else "",
            tls=tls.peer_credentials(config),
        )
        await self._join_cluster()
        admission = Admission(
            total_bytes=config.in_flight_bytes,
            tenant_bytes=config.tenant_in_flight_bytes,
            connection_bytes=config.connection_in_flight_bytes,
            tenant_requests=config.tenant_requests,
            metrics=self.metrics,
        )
        data = self.data = DataService(self.store, config, self.metrics, self.dataplane, self.cluster, admission)
        data_handler = data.handler().protect(self.guard).admit(admission, self.guard.table.rate)
        if self.local_channel and config.tls_client_ca:
            # Mutual TLS names who may connect; a Unix socket on this host would let others in without a certificate.
            log.info("local channel off: --tls-client-ca requires a client certificate on every connection")
            self.local_channel = False
        if self.local_channel and self.dataplane.enabled:
            self.local = LocalServer(socket_name(config.node_id), data_handler.methods, config.max_message_bytes)
        cluster = ClusterService(config, self.metrics, self.cluster, self.dataplane, self.local.name if self.local else "")
        self.rebalancer = Rebalancer(
            self.cluster,
            self.store,
            rate=config.rebalance_rate,
            interval=config.rebalance_interval,
            data_dir=Path(config.data_dir),
            peers=self.peers,
        )
        admin = AdminService(
            self.store, config, self.metrics, self.dataplane, self.cluster, self.membership, self.guard,
            self.rebalancer.snapshot, replicate=self.auth_sync.replicate,
        )
        self._handlers = (data_handler, cluster.handler().protect(self.guard), admin.handler().protect(self.guard))
        self._register(self.server)
        if self.local is not None:
            try:
                await self.local.start()
            except OSError as exc:
                log.warning("local channel off: cannot listen on its Unix socket: %s", exc)
                self.local = None
                cluster.local_socket = ""
        if not self.guard.open:
            # Catch up before serving: a token revoked while this daemon was down must not work here
            # even briefly. Peers that are down answer at once (connection refused) or within 2 s.
            await self.auth_sync.exchange(timeout=2.0)
        await self.server.start()
        self._guardian = asyncio.create_task(self._keep_grpc_serving(), name="kvstore-grpc-guardian")
        if self.health_server is not None:
            await self.health_server.start()
        self.rebalancer.start()
        self.auth_sync.start()
        self._wire_gauges()
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(config.metrics_host, config.metrics_port)
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.guard.open:
            log.warning(
                "UNAUTHENTICATED: --auth open: anyone who reaches %s may read, write and drop every namespace "
                "(start with --auth token to require credentials)",
                self.address,
            )
        log.info(
            "kvstore-server listening on %s%s auth=%s data_dir=%s memory=%s node_id=%s data_plane=%s%s",
            self.address,
            " (TLS" + (", client certificates required)" if config.tls_client_ca else ")") if config.tls else "",
            config.auth,
            Path(config.data_dir).resolve(),
            format_size(config.memory),
            config.node_id,
            f"ucx({self.dataplane.tls or 'default'})" if self.dataplane.enabled else "off",
            f" metrics=http://{config.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else "",
        )
        return self

    def _register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(self._handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            SERVICE_NAMES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )

    async def _keep_grpc_serving(self) -> None:
        """Serve again at once if grpc.aio's server loop dies under us.

        One request whose :path is not UTF-8 makes grpcio's asyncio server loop
        raise (it decodes the path before any handler of ours runs) and shut the
        whole server down, while the process lives on. A new server on the same
        port takes over within milliseconds; the calls in flight on the old one
        fail (UNAVAILABLE) and their clients retry."""
        while True:
            server = self.server
            try:
                # Shielded: cancelling this watch must not cancel the server's own shutdown future.
                await asyncio.shield(server.wait_for_termination())
                reason = "it stopped"
            except Exception as exc:  # the server loop's own exception
                reason = f"{type(exc).__name__}: {exc}"
            if self._stopping or self.server is not server:
                return
            log.error("the gRPC server stopped unexpectedly (%s); serving again on port %d", reason, self.port)
            self.metrics.grpc_restarts.inc()
            host, _ = parse_address(self.config.listen)
            address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
            for attempt in range(50):
                replacement = grpc.aio.server(options=server_options(self.config))
                try:
                    listen(replacement, address, self._tls)
                    break
                except ConfigError:  # the old socket is still closing
                    await asyncio.sleep(0.02 * (attempt + 1))
            else:
                log.error("cannot listen on %s again; stopping", address)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self._register(replacement)
            await replacement.start()
            self.server = replacement

    async def _join_cluster(self) -> None:
        config = self.config
        advertise = config.advertise or self.address
        me = Member(config.node_id, advertise)
        if config.etcd:
            from kvstore.server.cluster.etcd import EtcdMembership

            self.membership = EtcdMembership(config.etcd_endpoints, me, prefix=config.etcd_prefix, ttl=config.etcd_ttl)
        else:
            self.membership = StaticMembership(me, parse_peers(config.peers))
        self.cluster = ClusterState(
            config.node_id,
            advertise,
            MemberList(0, ()),
            Replication.of(config.replicas, config.write_quorum),
            vnodes=config.vnodes or DEFAULT_VNODES,
            data_dir=Path(config.data_dir),
        )
        self.auth_sync = AuthSync(self.guard.table, self.cluster, self.peers)
        if hasattr(self.membership, "put_auth"):
            self.auth_sync.use_etcd(self.membership)  # before start: its first list carries the table
        self.cluster.update(await self.membership.start(self.cluster.update, self._policies_changed))

    def _policies_changed(self, table: dict[tuple[str, str], dict]) -> None:
        """etcd's namespace policies, the same on every daemon."""
        policies = {}
        for (tenant, subtenant), policy in table.items():
            try:
                policies[Namespace(tenant, subtenant)] = Replication.of(policy["replicas"], policy.get("write_quorum", 0))
            except (KVStoreError, KeyError, TypeError) as exc:
                log.warning("ignoring the policy of %s/%s from etcd: %s", tenant, subtenant, exc)
        self.cluster.replace_policies(policies)

    def _wire_gauges(self) -> None:
        store, m = self.store, self.metrics
        m.tier_blocks.labels("memory").set_function(lambda: store.stats().memory.blocks)
        m.tier_bytes.labels("memory").set_function(lambda: store.stats().memory.bytes)
        m.tier_capacity.labels("memory").set_function(lambda: store.stats().memory.capacity_bytes)
        m.tier_blocks.labels("disk").set_function(lambda: store.stats().disk.blocks)
        m.tier_bytes.labels("disk").set_function(lambda: store.stats().disk.bytes)
        m.corrupt.set_function(lambda: store.stats().corrupt_blocks)
        m.evictions.set_function(lambda: store.stats().evictions)
        m.namespaces.set_function(lambda: store.stats().namespaces)
        status = self.rebalancer.status
        m.cluster_nodes.set_function(lambda: len(self.cluster.members.members))
        m.rebalance_scanned.set_function(lambda: status.keys_scanned)
        m.rebalance_total.set_function(lambda: status.keys_total)
        m.rebalance_copied.set_function(lambda: status.keys_copied)
        m.rebalance_bytes.set_function(lambda: status.bytes_copied)
        m.rebalance_dropped.set_function(lambda: status.keys_dropped)
        m.rebalance_running.set_function(lambda: status.state == "running")
        local = self.local
        m.local_connections.set_function(lambda: len(local.connections) if local else 0)
        m.local_in_flight.set_function(lambda: sum(len(c.tasks) for c in local.connections) if local else 0)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish (up to ``grace`` seconds), flush, close."""
        grace = self.config.drain_seconds if grace is None else grace
        self._stopping = True
        if self._guardian is not None:
            self._guardian.cancel()
            await asyncio.gather(self._guardian, return_exceptions=True)
            self._guardian = None
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            # Both transports drain in the same window.
            local = self.local.stop(grace) if self.local is not None else asyncio.sleep(0)
            await asyncio.gather(self.server.stop(grace), local)
            self.server = None
            self.local = None
        if self.health_server is not None:
            await self.health_server.stop(0)
            self.health_server = None
        if self.auth_sync is not None:
            await self.auth_sync.stop()
            self.auth_sync = None
        if self.rebalancer is not None:
            await self.rebalancer.stop()
            self.rebalancer = None
        if self.membership is not None:
            await self.membership.stop()
            self.membership = None
        if self.peers is not None:
            await self.peers.close()
            self.peers = None
        if self.guard is not None:
            self.guard.close()
        if self.dataplane is not None:
            await self.dataplane.close()
            self.dataplane = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        self.metrics.close()

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()
