"""A local cluster on loopback: N ``kvstore-server`` daemons (and, with etcd
membership, one etcd) under one folder. ``kvstore cluster up|status|down``
drives it through ``up``, ``status`` and ``down``; the tests and the bench
start and stop it as a ``LocalCluster``.

    DIR/cluster.json          what was started: nodes, ports, pids, settings
    DIR/nodeK/data            node K's data dir
    DIR/nodeK/server.log      node K's stdout and stderr (appended on every start)
    DIR/etcd/data, etcd.log   etcd's data and log, with etcd membership

Ports are chosen once, when the cluster is created; a later start of a stopped
cluster starts the same daemons on the same ports and data, so the blocks
survive a ``down``/``up``. Processes are identified by pid *and* command line
(their data dir), so a pid the system has since given to another program is
never signalled. The CLI's daemons are detached and outlive it; a test's or the
bench's are this process's children.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kvstore.harness.daemon import DaemonProcess
from kvstore.harness.etcd import EtcdProcess
from kvstore.harness.health import etcd_healthy, probe_all
from kvstore.harness.ports import check_free, free_port, free_ports
from kvstore.harness.process import HarnessError, ServerProcess, terminate_all, wait_ready

DEFAULT_DIR = "kvstore-cluster"
STATE_FILE = "cluster.json"
DEFAULT_NODES = 3
DEFAULT_MEMORY = "256MiB"


class ClusterError(HarnessError):
    """The options contradict the cluster, or there is no cluster where one is asked for."""


class AlreadyRunning(ClusterError):
    """``up`` on a folder whose cluster runs in full."""


@dataclass
class LocalCluster:
    """The cluster in ``dir``: its daemons, in node order, and its etcd, if it runs one.

    Membership is static (every daemon gets ``--peers`` naming all of them), or
    through the cluster's own etcd, or through ``etcd_endpoints``, an etcd the
    cluster uses but does not run. ``spawn`` holds how its processes start
    (``DaemonProcess`` keywords: ``detach``, ``die_with_parent``, ``env``); it is
    not part of the state file.
    """

    dir: Path
    nodes: list[DaemonProcess]
    etcd: EtcdProcess | None = None
    replicas: int | None = None
    write_quorum: int | None = None
    memory: str = DEFAULT_MEMORY
    server_args: list[str] = field(default_factory=list)
    etcd_endpoints: str | None = None
    spawn: dict = field(default_factory=dict, repr=False, compare=False)

    # -- the state file ------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | Path,
        nodes: int = DEFAULT_NODES,
        *,
        etcd: bool = False,
        etcd_endpoints: str | None = None,
        replicas: int | None = None,
        write_quorum: int | None = None,
        memory: str = DEFAULT_MEMORY,
        base_port: int | None = None,
        server_args: Sequence[str] = (),
        **spawn,
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
                try:
                    check_free(port)
                except OSError as exc:
                    raise ClusterError(exc.strerror) from None
        cluster = cls(
            root,
            [],
            replicas=replicas,
            write_quorum=write_quorum,
            memory=memory,
            server_args=list(server_args),
            etcd_endpoints=etcd_endpoints,
            spawn=spawn,
        )
        cluster.nodes = [cluster._node(f"node{k}", ports[k - 1]) for k in range(1, nodes + 1)]
        if etcd:
            cluster.etcd = cluster._etcd(ports[nodes], ports[nodes + 1])
        return cluster

    @classmethod
    def load(cls, directory: str | Path, **spawn) -> "LocalCluster | None":
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
            cluster = cls(
                root,
                [],
                replicas=state.get("replicas"),
                write_quorum=state.get("write_quorum"),
                memory=state.get("memory", DEFAULT_MEMORY),
                server_args=list(state.get("server_args", [])),
                etcd_endpoints=state.get("etcd_endpoints"),
                spawn=spawn,
            )
            cluster.nodes = [
                cluster._node(n["id"], n["port"], data_dir=n["data_dir"], log_file=n["log"], pid=n.get("pid", 0))
                for n in state["nodes"]
            ]
            etcd = state.get("etcd")
            if etcd:
                cluster.etcd = cluster._etcd(
                    etcd["client_port"], etcd["peer_port"], data_dir=etcd["data_dir"], log_file=etcd["log"], pid=etcd["pid"]
                )
        except (KeyError, TypeError) as exc:
            raise ClusterError(f"{path} is not a kvstore cluster file ({exc!r})") from None
        return cluster

    def _node(self, node_id: str, port: int, *, data_dir=None, log_file=None, pid: int = 0) -> DaemonProcess:
        home = self.dir / node_id
        node = DaemonProcess(
            data_dir or home / "data",
            port=port,
            node_id=node_id,
            log_file=log_file or home / "server.log",
            pid=pid,
            **self.spawn,
        )
        node.cwd = Path(node.data_dir).parent
        return node

    def _etcd(self, client_port: int, peer_port: int, *, data_dir=None, log_file=None, pid: int = 0) -> EtcdProcess:
        spawn = {k: v for k, v in self.spawn.items() if k != "env"}  # etcd gets its own environment
        return EtcdProcess(
            data_dir or self.dir / "etcd" / "data",
            log_file or self.dir / "etcd" / "etcd.log",
            client_port=client_port,
            peer_port=peer_port,
            pid=pid,
            **spawn,
        )

    def to_dict(self) -> dict:
        state = {
            "dir": str(self.dir),
            "endpoints": ",".join(self.endpoints),
            "nodes": [n.to_dict() for n in self.nodes],
            "etcd": self.etcd.to_dict() if self.etcd else None,
            "replicas": self.replicas,
            "write_quorum": self.write_quorum,
            "memory": self.memory,
            "server_args": self.server_args,
        }
        if self.etcd_endpoints:
            state["etcd_endpoints"] = self.etcd_endpoints
        return state

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(self.dir / STATE_FILE)

    # -- its nodes ---------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]

    @property
    def ports(self) -> dict[str, int]:
        return {n.node_id: n.port for n in self.nodes}

    @property
    def endpoints(self) -> list[str]:
        """The daemons' addresses (joined with commas: the form of ``KVSTORE_ENDPOINTS``)."""
        return [n.address for n in self.nodes]

    def __getitem__(self, node_id: str) -> DaemonProcess:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    def server_args_for(self, node: DaemonProcess) -> list[str]:
        """The flags a node runs with besides --listen, --data-dir and --node-id."""
        args = ["--memory", self.memory]
        if self.etcd is not None:
            args += ["--etcd", self.etcd.endpoint]
        elif self.etcd_endpoints:
            args += ["--etcd", self.etcd_endpoints]
        else:
            args += ["--peers", ",".join(f"{n.node_id}={n.address}" for n in self.nodes)]
        if self.replicas is not None:
            args += ["--replicas", str(self.replicas)]
        if self.write_quorum is not None:
            args += ["--write-quorum", str(self.write_quorum)]
        return args + self.server_args

    # -- starting ------------------------------------------------------------------

    def start(self, wait: float = 60.0, on_start: Callable[[str, int], None] | None = None) -> list[str]:
        """Start whatever is not running (etcd first), wait until all of it answers,
        record the pids. Returns the names started. On failure kills what it started."""
        started: list[ServerProcess] = []
        deadline = time.monotonic() + wait
        try:
            if self.etcd is not None and not self.etcd.running:
                self.etcd.start(wait=False)
                started.append(self.etcd)
                self.save()
                wait_ready([self.etcd], wait)  # daemons register with etcd as they start
                if on_start:
                    on_start(self.etcd.name, self.etcd.pid)
            for node in self.nodes:
                if not node.running:
                    node.args = self.server_args_for(node)
                    node.start(wait=False)
                    started.append(node)
            self.save()
            wait_ready([p for p in started if p is not self.etcd], max(0.0, deadline - time.monotonic()))
        except BaseException:
            for process in reversed(started):
                process.kill9()
            raise
        if on_start:
            for process in started:
                if process is not self.etcd:
                    on_start(process.name, process.pid)
        return [p.name for p in started]

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until every daemon serves one cluster map (same epoch) naming every node.

        Static peers agree at once; under etcd the daemons learn of each other
        through their watches. False if that did not happen within ``timeout``.
        """
        want = tuple(sorted(self.ids))
        deadline = time.monotonic() + timeout
        while True:
            report = status(self, timeout=1.0)
            views = {(n.get("epoch"), tuple(sorted(n.get("members", ())))) for n in report["nodes"]}
            if report["up"] == report["total"] and len(views) == 1 and next(iter(views))[1] == want:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    # -- joins and leaves (a running cluster) ------------------------------------------

    def add(self, node_id: str, wait: float = 30.0) -> DaemonProcess:
        """Start one more daemon on a free port (etcd membership: the others see it join)."""
        node = self._node(node_id, free_port())
        self.nodes.append(node)
        node.args = self.server_args_for(node)
        node.start(wait)
        self.save()
        return node

    def remove(self, node_id: str, wait: float = 30.0) -> None:
        """Stop one daemon for good (SIGTERM: under etcd it leaves the map at once)."""
        node = self[node_id]
        self.nodes.remove(node)
        node.stop(wait)
        self.save()

    def reconfigure(self, ids: Sequence[str], wait: float = 30.0) -> None:
        """Make ``ids`` the members: every daemon restarts in turn with the new
        peer list (SIGTERM, then start), new ones start, dropped ones stop."""
        known = {n.node_id: n for n in self.nodes}
        gone = [n for n in self.nodes if n.node_id not in ids]
        self.nodes = [known.get(i) or self._node(i, free_port()) for i in ids]
        for node in self.nodes:
            node.stop(wait)
            node.args = self.server_args_for(node)
            node.start(wait)
        for node in gone:
            node.stop(wait)
        self.save()

    # -- stopping --------------------------------------------------------------

    def processes(self) -> list[ServerProcess]:
        """Every process of the cluster, daemons first."""
        return [*self.nodes, *([self.etcd] if self.etcd is not None else [])]

    def running(self) -> list[str]:
        return [p.name for p in self.processes() if p.running]

    def stop(self, wait: float = 30.0) -> list[dict]:
        """SIGTERM the daemons, then etcd; SIGKILL whatever is left after ``wait`` seconds.

        Returns one report per process: name, pid, and what happened
        ("stopped", "killed", "still running" or "not running").
        """
        report = []
        # Daemons first: they leave etcd while it still answers.
        for group in (self.nodes, [self.etcd] if self.etcd is not None else []):
            pids = [p.pid for p in group]
            for process, pid, result in zip(group, pids, terminate_all(group, wait)):
                report.append({"name": process.name, "pid": pid, "result": result})
        return report

    def kill(self) -> None:
        """SIGKILL every process of the cluster (a test's clean-up, pass or fail)."""
        for process in self.processes():
            process.kill9()


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
    """Start a cluster in ``directory``, detached from this process: a new one, or the
    stopped one recorded there (same ports and data), or the stopped nodes of a partly
    running one.

    Raises AlreadyRunning when every process already runs, ClusterError when the
    options contradict the recorded cluster, StartError when something fails to start.
    Returns the cluster, the names of the processes started, and whether the
    daemons then agreed on one cluster map naming every node (see ``settle``).
    """
    cluster = LocalCluster.load(directory, detach=True)
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
            detach=True,
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
        if len(cluster.running()) == len(cluster.processes()):
            raise AlreadyRunning(f"a cluster is already running in {cluster.dir}: {','.join(cluster.endpoints)}")
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


def status(cluster: LocalCluster | None = None, endpoints: Sequence[str] = (), timeout: float = 3.0) -> dict:
    """Health, epoch, blocks and bytes, data plane and rebalancing of every node,
    of a local ``cluster`` or of the daemons at ``endpoints``.

    A node that does not answer is reported with health "down" and the error.
    """
    if cluster is not None:
        known = [{"id": n.node_id, "address": n.address, "pid": n.pid, "process": n.running} for n in cluster.nodes]
    else:
        known = [{"id": "", "address": a} for a in endpoints]
    probes = probe_all([k["address"] for k in known], timeout)
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
