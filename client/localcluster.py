"""A local cluster on loopback: N ``kvstore-server`` daemons (and, with etcd
membership, one etcd) run as background processes under one folder. This is
what ``kvstore cluster up|status|down`` drives.

    DIR/cluster.json          what was started: nodes, ports, pids, settings
    DIR/nodeK/data            node K's data dir
    DIR/nodeK/server.log      node K's stdout and stderr (appended on every start)
    DIR/etcd/data, etcd.log   etcd's data and log, with etcd membership

Ports are chosen once, by the first ``up``; a later ``up`` on a stopped cluster
starts the same daemons on the same ports and data, so the blocks survive a
``down``/``up``. Processes are identified by pid *and* command line, so a pid
the system has since given to another program is never signalled.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore._proto.v1 import admin_pb2, cluster_pb2

DEFAULT_DIR = "kvstore-cluster"
STATE_FILE = "cluster.json"
HOST = "127.0.0.1"
DEFAULT_NODES = 3
DEFAULT_MEMORY = "256MiB"
ETCD_BINARY = "/usr/bin/etcd"  # Debian's etcd-server package


class ClusterError(Exception):
    """Something the user must hear about; the message says what and where."""


class AlreadyRunning(ClusterError):
    pass


# -- processes -----------------------------------------------------------------


def process_running(pid: int, marker: str = "") -> bool:
    """Whether ``pid`` is a live (not zombie) process whose command line contains ``marker``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: not one of ours
    proc = Path("/proc")
    if not (proc / "self").exists():
        return True  # no procfs: the pid is all we can go by
    try:
        stat = (proc / str(pid) / "stat").read_text()
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return False  # exited, waiting to be reaped
    return not marker or marker in cmdline.replace(b"\0", b" ").decode(errors="replace")


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _spawn(cmd: list[str], log_path: str, cwd: str) -> subprocess.Popen:
    """Start ``cmd`` detached (own session, no stdin), stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} kvstore cluster up: {shlex.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _check_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise ClusterError(f"port {port} on {HOST} is not free: {exc.strerror}") from None


def grpc_healthy(address: str, timeout: float = 1.0) -> bool:
    """Whether the daemon at ``address`` answers the gRPC health check as SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def etcd_healthy(endpoint: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=timeout) as reply:
            return json.loads(reply.read()).get("health") == "true"
    except (OSError, ValueError):
        return False


# -- the cluster ---------------------------------------------------------------


@dataclass
class Node:
    id: str
    port: int
    data_dir: str
    log: str
    pid: int = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        # The data dir is on the daemon's command line: it tells our daemon from a reused pid.
        return process_running(self.pid, self.data_dir)


@dataclass
class Etcd:
    client_port: int
    peer_port: int
    data_dir: str
    log: str
    pid: int = 0

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.client_port}"

    @property
    def running(self) -> bool:
        return process_running(self.pid, self.data_dir)


@dataclass
class LocalCluster:
    dir: Path
    nodes: list[Node]
    etcd: Etcd | None = None
    replicas: int | None = None
    write_quorum: int | None = None
    memory: str = DEFAULT_MEMORY
    server_args: list[str] = field(default_factory=list)

    # -- the state file ------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | Path,
        nodes: int = DEFAULT_NODES,
        *,
        etcd: bool = False,
        replicas: int | None = None,
        write_quorum: int | None = None,
        memory: str = DEFAULT_MEMORY,
        base_port: int | None = None,
        server_args: Sequence[str] = (),
    ) -> "LocalCluster":
        """A new cluster's layout, its ports chosen now (node K on base_port+K-1 when given)."""
        if nodes < 1:
            raise ClusterError(f"--nodes {nodes}: give at least one node")
        if replicas is not None and not 1 <= replicas <= nodes:
            raise ClusterError(f"--replicas {replicas}: must be between 1 and the number of nodes ({nodes})")
        if write_quorum is not None and not 1 <= write_quorum <= (replicas or 1):
            raise ClusterError(f"--write-quorum {write_quorum}: must be between 1 and the replicas ({replicas or 1})")
        root = Path(directory).resolve()
        wanted = nodes + (2 if etcd else 0)
        if base_port is None:
            ports = free_ports(wanted)
        else:
            ports = list(range(base_port, base_port + wanted))
            if base_port < 1 or ports[-1] > 65535:
                raise ClusterError(f"--base-port {base_port}: ports {ports[0]}..{ports[-1]} are out of range")
            for port in ports:
                _check_free(port)
        members = [
            Node(f"node{k}", ports[k - 1], str(root / f"node{k}" / "data"), str(root / f"node{k}" / "server.log"))
            for k in range(1, nodes + 1)
        ]
        etcd_spec = None
        if etcd:
            etcd_spec = Etcd(ports[nodes], ports[nodes + 1], str(root / "etcd" / "data"), str(root / "etcd" / "etcd.log"))
        return cls(root, members, etcd_spec, replicas, write_quorum, memory, list(server_args))

    @classmethod
    def load(cls, directory: str | Path) -> "LocalCluster | None":
        """The cluster recorded in ``directory``, or None if there is none."""
        root = Path(directory).resolve()
        path = root / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ClusterError(f"cannot read {path}: {exc}") from None
        try:
            etcd = state.get("etcd")
            return cls(
                root,
                [Node(n["id"], n["port"], n["data_dir"], n["log"], n.get("pid", 0)) for n in state["nodes"]],
                Etcd(**{k: etcd[k] for k in ("client_port", "peer_port", "data_dir", "log", "pid")}) if etcd else None,
                state.get("replicas"),
                state.get("write_quorum"),
                state.get("memory", DEFAULT_MEMORY),
                list(state.get("server_args", [])),
            )
        except (KeyError, TypeError) as exc:
            raise ClusterError(f"{path} is not a kvstore cluster file ({exc!r})") from None

    def to_dict(self) -> dict:
        nodes = [{**asdict(n), "address": n.address} for n in self.nodes]
        etcd = {**asdict(self.etcd), "endpoint": self.etcd.endpoint} if self.etcd else None
        return {
            "dir": str(self.dir),
            "endpoints": self.endpoints,
            "nodes": nodes,
            "etcd": etcd,
            "replicas": self.replicas,
            "write_quorum": self.write_quorum,
            "memory": self.memory,
            "server_args": self.server_args,
        }

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(self.dir / STATE_FILE)

    @property
    def endpoints(self) -> str:
        """The daemons' addresses as a comma list, the form of ``KVSTORE_ENDPOINTS``."""
        return ",".join(n.address for n in self.nodes)

    # -- starting --------------------------------------------------------------

    def server_command(self, node: Node) -> list[str]:
        cmd = [
            sys.executable, "-m", "kvstore.server",
            "--listen", node.address,
            "--data-dir", node.data_dir,
            "--node-id", node.id,
            "--memory", self.memory,
        ]
        if self.etcd is not None:
            cmd += ["--etcd", self.etcd.endpoint]
        else:
            cmd += ["--peers", ",".join(f"{n.id}={n.address}" for n in self.nodes)]
        if self.replicas is not None:
            cmd += ["--replicas", str(self.replicas)]
        if self.write_quorum is not None:
            cmd += ["--write-quorum", str(self.write_quorum)]
        return cmd + self.server_args

    def etcd_command(self) -> list[str]:
        assert self.etcd is not None
        binary = shutil.which("etcd") or ETCD_BINARY
        if not os.access(binary, os.X_OK):
            raise ClusterError(f"etcd membership needs the etcd server ({ETCD_BINARY}): apt-get install etcd-server")
        e = self.etcd
        client, peer = f"http://{HOST}:{e.client_port}", f"http://{HOST}:{e.peer_port}"
        return [
            binary,
            "--name", "kvstore-local",
            "--data-dir", e.data_dir,
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"kvstore-local={peer}",
            "--initial-cluster-state", "new",
        ]

    def start(self, wait: float = 60.0, on_start: Callable[[str, int], None] | None = None) -> list[str]:
        """Start whatever is not running (etcd first), wait until all of it answers,
        record the pids. Returns the names started. On failure stops what it started."""
        started: list[tuple[str, subprocess.Popen, Callable[[], bool], str]] = []
        deadline = time.monotonic() + wait
        try:
            if self.etcd is not None and not self.etcd.running:
                cmd = self.etcd_command()
                Path(self.etcd.data_dir).parent.mkdir(parents=True, exist_ok=True)
                proc = _spawn(cmd, self.etcd.log, str(Path(self.etcd.data_dir).parent))
                self.etcd.pid = proc.pid
                self.save()
                entry = ("etcd", proc, lambda e=self.etcd.endpoint: etcd_healthy(e), self.etcd.log)
                started.append(entry)
                self._wait_ready([entry], deadline)  # daemons register with etcd as they start
                if on_start:
                    on_start("etcd", proc.pid)
            for node in self.nodes:
                if node.running:
                    continue
                Path(node.data_dir).mkdir(parents=True, exist_ok=True)
                proc = _spawn(self.server_command(node), node.log, str(Path(node.data_dir).parent))
                node.pid = proc.pid
                started.append((node.id, proc, lambda a=node.address: grpc_healthy(a), node.log))
            self.save()
            self._wait_ready([s for s in started if s[0] != "etcd"], deadline)
        except BaseException:
            for _, proc, _, _ in reversed(started):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            raise
        if on_start:
            for name, proc, _, _ in started:
                if name != "etcd":
                    on_start(name, proc.pid)
        return [name for name, *_ in started]

    @staticmethod
    def _wait_ready(entries, deadline: float) -> None:
        pending = list(entries)
        while pending:
            for entry in list(pending):
                name, proc, ready, log = entry
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with status {proc.returncode}; the end of {log}:\n{_log_tail(log)}")
                if ready():
                    pending.remove(entry)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(e[0] for e in pending)
                raise ClusterError(f"{names} did not answer in time; the end of {pending[0][3]}:\n{_log_tail(pending[0][3])}")
            time.sleep(0.1)

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until every daemon serves one cluster map (same epoch) naming every node.

        Static peers agree at once; under etcd the daemons learn of each other
        through their watches. False if that did not happen within ``timeout``.
        """
        want = sorted(n.id for n in self.nodes)
        deadline = time.monotonic() + timeout
        while True:
            report = status(self, timeout=1.0)
            views = {(n.get("epoch"), tuple(sorted(n.get("members", ())))) for n in report["nodes"]}
            if report["up"] == report["total"] and len(views) == 1 and next(iter(views))[1] == tuple(want):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    # -- stopping --------------------------------------------------------------

    def processes(self) -> list[tuple[str, int, Callable[[], bool]]]:
        """(name, pid, is-running) of every process of the cluster, daemons first."""
        out: list[tuple[str, int, Callable[[], bool]]] = [(n.id, n.pid, lambda n=n: n.running) for n in self.nodes]
        if self.etcd is not None:
            out.append(("etcd", self.etcd.pid, lambda: self.etcd.running))
        return out

    def running(self) -> list[str]:
        return [name for name, _, running in self.processes() if running()]

    def stop(self, wait: float = 30.0) -> list[dict]:
        """SIGTERM the daemons, then etcd; SIGKILL whatever is left after ``wait`` seconds.

        Returns one report per process: name, pid, and what happened
        ("stopped", "killed" or "not running").
        """
        report = []
        daemons = [p for p in self.processes() if p[0] != "etcd"]
        etcd = [p for p in self.processes() if p[0] == "etcd"]
        for group in (daemons, etcd):  # daemons first: they leave etcd while it still answers
            live = [(name, pid, running) for name, pid, running in group if running()]
            report += [{"name": name, "pid": pid, "result": "not running"} for name, pid, running in group
                       if (name, pid, running) not in live]
            for _, pid, _ in live:
                _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + wait
            while any(running() for _, _, running in live) and time.monotonic() < deadline:
                time.sleep(0.05)
            for name, pid, running in live:
                result = "stopped"
                if running():
                    _signal(pid, signal.SIGKILL)
                    kill_deadline = time.monotonic() + 10
                    while running() and time.monotonic() < kill_deadline:
                        time.sleep(0.05)
                    result = "killed" if not running() else "still running"
                report.append({"name": name, "pid": pid, "result": result})
        order = {name: i for i, (name, _, _) in enumerate(self.processes())}
        report.sort(key=lambda r: order[r["name"]])
        return report


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- the commands ----------------------------------------------------------------


def up(
    directory: str | Path = DEFAULT_DIR,
    nodes: int | None = None,
    *,
    etcd: bool | None = None,
    replicas: int | None = None,
    write_quorum: int | None = None,
    memory: str | None = None,
    base_port: int | None = None,
    server_args: Sequence[str] | None = None,
    wait: float = 60.0,
    on_start: Callable[[str, int], None] | None = None,
) -> tuple[LocalCluster, list[str], bool]:
    """Start a cluster in ``directory``: a new one, or the stopped one recorded there
    (same ports and data), or the stopped nodes of a partly running one.

    Raises AlreadyRunning when every process already runs, ClusterError when the
    options contradict the recorded cluster or something fails to start.
    Returns the cluster, the names of the processes started, and whether the
    daemons then agreed on one cluster map naming every node (see ``settle``).
    """
    cluster = LocalCluster.load(directory)
    if cluster is None:
        cluster = LocalCluster.create(
            directory,
            DEFAULT_NODES if nodes is None else nodes,
            etcd=bool(etcd),
            replicas=replicas,
            write_quorum=write_quorum,
            memory=memory or DEFAULT_MEMORY,
            base_port=base_port,
            server_args=server_args or (),
        )
    else:
        fixed = {
            "--nodes": (nodes, len(cluster.nodes)),
            "--etcd": (etcd, cluster.etcd is not None),
            "--replicas": (replicas, cluster.replicas),
            "--write-quorum": (write_quorum, cluster.write_quorum),
            "--base-port": (base_port, cluster.nodes[0].port),
        }
        for flag, (given, recorded) in fixed.items():
            if given is not None and given != recorded:
                raise ClusterError(
                    f"{cluster.dir} holds a cluster started with {flag} {recorded}; "
                    f"to change it, `kvstore cluster down --dir {cluster.dir}` and remove the folder"
                )
        running = cluster.running()
        if len(running) == len(cluster.processes()):
            raise AlreadyRunning(f"a cluster is already running in {cluster.dir}: {cluster.endpoints}")
        if memory is not None:
            cluster.memory = memory
        if server_args:
            cluster.server_args = list(server_args)
    started = cluster.start(wait, on_start)
    return cluster, started, cluster.settle(min(10.0, wait))


def down(directory: str | Path = DEFAULT_DIR, wait: float = 30.0) -> tuple[LocalCluster, list[dict]]:
    cluster = LocalCluster.load(directory)
    if cluster is None:
        raise ClusterError(f"no cluster in {Path(directory).resolve()} (no {STATE_FILE})")
    return cluster, cluster.stop(wait)


# -- status ------------------------------------------------------------------------


def _rpc_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


async def _probe(address: str, timeout: float) -> dict:
    from kvstore.client.transport import Connection

    conn = Connection(address)
    try:
        try:
            health = await health_pb2_grpc.HealthStub(conn.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return {"health": "down", "error": _rpc_error(exc)}
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            return {"health": "down", "error": f"health check: {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}"}
        out: dict = {"health": "up", "error": None}
        stats, cmap = await asyncio.gather(
            conn.admin.ServerStats(admin_pb2.ServerStatsRequest(), timeout=timeout),
            conn.cluster.GetClusterMap(cluster_pb2.GetClusterMapRequest(), timeout=timeout),
            return_exceptions=True,
        )
        if isinstance(stats, BaseException):
            out["error"] = f"ServerStats: {_rpc_error(stats)}"
        else:
            r = stats.rebalance
            out.update(
                id=stats.node_id,
                uptime_seconds=stats.uptime_seconds,
                membership=stats.membership,
                tiers={t.name: {"blocks": t.blocks, "bytes": t.bytes, "capacity_bytes": t.capacity_bytes} for t in stats.tiers},
                data_plane={"enabled": stats.data_plane, "ucx_tls": stats.ucx_tls, "clients": stats.data_plane_clients},
                rebalance={
                    "state": r.state or "idle",
                    "epoch": r.epoch,
                    "keys_scanned": r.keys_scanned,
                    "keys_total": r.keys_total,
                    "keys_copied": r.keys_copied,
                    "bytes_copied": r.bytes_copied,
                    "keys_dropped": r.keys_dropped,
                    "errors": r.errors,
                    "last_error": r.last_error,
                },
            )
        if isinstance(cmap, BaseException):
            out["error"] = f"GetClusterMap: {_rpc_error(cmap)}"
        else:
            out.update(
                epoch=cmap.epoch,
                members=[n.node_id for n in cmap.nodes],
                replicas=cmap.replicas,
                write_quorum=cmap.write_quorum,
            )
        return out
    finally:
        await conn.close()


async def _probe_all(addresses: Sequence[str], timeout: float) -> list[dict]:
    return list(await asyncio.gather(*(_probe(a, timeout) for a in addresses)))


def status(
    cluster: LocalCluster | None = None, endpoints: Sequence[str] = (), timeout: float = 3.0
) -> dict:
    """Health, epoch, blocks and bytes, data plane and rebalancing of every node,
    of a local ``cluster`` or of the daemons at ``endpoints``.

    A node that does not answer is reported with health "down" and the error.
    """
    if cluster is not None:
        known = [{"id": n.id, "address": n.address, "pid": n.pid, "process": n.running} for n in cluster.nodes]
    else:
        known = [{"id": "", "address": a} for a in endpoints]
    probes = asyncio.run(_probe_all([k["address"] for k in known], timeout))
    nodes = []
    for k, p in zip(known, probes):
        node = {**k, **p}
        node["id"] = p.get("id") or k["id"] or k["address"]
        nodes.append(node)
    up_nodes = [n for n in nodes if n["health"] == "up"]
    out = {
        "endpoints": ",".join(k["address"] for k in known),
        "nodes": nodes,
        "up": len(up_nodes),
        "total": len(nodes),
        "epochs": sorted({n["epoch"] for n in up_nodes if "epoch" in n}),
    }
    if cluster is not None:
        out["dir"] = str(cluster.dir)
        if cluster.etcd is not None:
            e = cluster.etcd
            out["etcd"] = {
                "endpoint": e.endpoint,
                "pid": e.pid,
                "health": "up" if e.running and etcd_healthy(e.endpoint) else "down",
            }
    return out
