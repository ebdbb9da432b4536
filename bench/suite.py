"""The cases of ``python -m bench`` and the order they run in.

For every block size and every concurrency (client processes at once):

  limits    memcpy, loopback TCP                             (bench.limits)
  kvstore   zero-copy (shm): put, get, put (disk)            one daemon for all
            zero-copy (tcp): put, get                        (bench.kvstore_runner)
            inline:          put, get
  peers     redis, mooncake (tcp), mooncake (shm), lmcache: put, get
            (after the daemon has stopped, each alone on the machine)

"put" stores with durability "memory" (peers keep blocks in memory too); "put
(disk)" is acknowledged once in a segment file and indexed; "get" reads back
the blocks of the "put" case with the same concurrency, each client its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bench.kvstore_runner import MODES, SUBTENANT, TENANT, Admin
from bench.limits import MEMCPY, TCP
from bench.measure import BenchError, Result, best_runs, calls_per_client
from bench.progress import Progress
from bench.report import rate, size_label
from bench.workers import Case, WorkerPool


@dataclass(frozen=True)
class Plan:
    sizes: list[int]
    batch: int
    levels: list[int]  # concurrencies, e.g. [1, 4]
    volume: int  # bytes per case, over all its clients
    min_calls: int  # calls per case at least, over all its clients

    @property
    def processes(self) -> int:
        return max(self.levels)

    def calls(self, size: int, concurrency: int) -> int:
        """Calls per client."""
        return calls_per_client(self.volume, size, batch=self.batch, min_calls=self.min_calls, concurrency=concurrency)

    def case_bytes(self, size: int, concurrency: int) -> int:
        return self.calls(size, concurrency) * concurrency * self.batch * size

    def dst_blocks(self, size: int, levels: list[int] | None = None) -> list[int]:
        """Blocks each client's get destination holds: all of its largest get case."""
        levels = self.levels if levels is None else levels
        return [
            max([self.calls(size, c) * self.batch for c in levels if worker < c], default=self.batch)
            for worker in range(self.processes)
        ]

    def largest_case(self) -> int:
        return max(self.case_bytes(s, c) for s in self.sizes for c in self.levels)

    def total_bytes(self, kvstore_cases: int, peer_cases: int) -> int:
        per_case = sum(self.case_bytes(s, c) for s in self.sizes for c in self.levels)
        return per_case * (2 + kvstore_cases + peer_cases)


def _case(plan: Plan, system: str, tag: str, op: str, size: int, concurrency: int, keys: str, durability="memory") -> Case:
    return Case(system, op, tag, size, plan.batch, plan.calls(size, concurrency), concurrency, keys, durability)


def warm_up(pool: WorkerPool, plan: Plan, system: str, tag: str, progress: Progress, conc: int | None = None) -> Result:
    """One unmeasured put of the largest case (largest block size, most clients): the store's memory
    is touched once before anything is timed, as in a store that has been running a while. Fresh
    anonymous memory costs a page fault per page on first write (in this kind of VM, a costly one),
    which would otherwise land on whichever case happens to run first. The caller empties the store."""
    size, conc = max(plan.sizes), conc or plan.processes
    progress.stage(f"{system}: warming the store up (unmeasured)")
    pool.prepare(size, plan.batch, plan.dst_blocks(size))
    return pool.run(_case(plan, system, tag, "put", size, conc, "warm"))


def run_limits(pool: WorkerPool, plan: Plan, progress: Progress, *, repeats: int = 1) -> list[Result]:
    """memcpy and loopback TCP, each case the best of ``repeats`` runs."""
    results = []
    for kind, system, op in (("memcpy", MEMCPY, "copy"), ("tcp", TCP, "send")):
        pool.open({"kind": kind})
        for size in plan.sizes:
            pool.prepare(size, plan.batch, [plan.batch] * plan.processes)
            for conc in plan.levels:
                for run in runs(repeats):
                    progress.stage(f"{size_label(size)} ×{conc} {system}{run}")
                    results.append(pool.run(_case(plan, system, kind, op, size, conc, op)))
                    progress.advance(plan.case_bytes(size, conc))
        pool.close_driver()
    return best_runs(results)


def runs(repeats: int) -> list[str]:
    """A progress suffix per run of a case ("" when it runs once)."""
    return [""] if repeats == 1 else [f" (run {i + 1}/{repeats})" for i in range(repeats)]


def run_kvstore(
    pool: WorkerPool, address: str, plan: Plan, progress: Progress, *, modes=("shm", "tcp", "inline"),
    disk_modes=("shm",), max_batch_bytes: int | None = None, warm: bool = True,
) -> tuple[list[Result], list[str], dict]:
    """Every kvstore case against the daemon at ``address`` once; (results, notes, client settings per mode)."""
    admin = Admin(address)
    admin.drop()
    results, notes, described = [], [], {}
    for mode in modes:
        system, tag = MODES[mode]
        spec = {"kind": "kvstore", "address": address, "mode": mode, "tenant": TENANT, "subtenant": SUBTENANT}
        if max_batch_bytes:
            spec["max_batch_bytes"] = max_batch_bytes
        described[system] = pool.open(spec)[0]
        if warm and mode == modes[0]:  # one memory tier for every mode: warmed once
            before = admin.stats()
            warmed = warm_up(pool, plan, system, tag, progress)
            admin.settle(before["tiers"]["disk"]["blocks"] + warmed.blocks)
            admin.drop()
            notes.append(f"kvstore: before the timed cases, {warmed.blocks} blocks of {size_label(warmed.block_size)} "
                         f"({size_label(warmed.nbytes)}) were put once and dropped, unmeasured, to touch the "
                         "daemon's memory tier (it ran at " + rate(warmed.gbps) + " GB/s).")
        for size in plan.sizes:
            label = size_label(size)
            pool.prepare(size, plan.batch, plan.dst_blocks(size))
            for conc in plan.levels:
                before = admin.stats()
                progress.stage(f"{label} ×{conc} {system} put")
                put = pool.run(_case(plan, system, tag, "put", size, conc, "put"))
                results.append(put)
                progress.advance(plan.case_bytes(size, conc))
                waited = admin.settle(before["tiers"]["disk"]["blocks"] + put.blocks)
                if waited is None:
                    notes.append(f"{label} ×{conc} {system} put: the write-back to disk had not finished "
                                 "300 s after the last put; it overlapped the get case.")
                elif waited > 1.0:
                    notes.append(f"{label} ×{conc} {system} put: the write-back to disk of these \"memory\" puts "
                                 f"finished {waited:.1f} s after the last one (waited for, outside the timings).")
                progress.stage(f"{label} ×{conc} {system} get")
                results.append(pool.run(_case(plan, system, tag, "get", size, conc, "put")))
                progress.advance(plan.case_bytes(size, conc))
                after = admin.stats()
                evicted = after["evictions"] - before["evictions"]
                if evicted:
                    notes.append(f"{label} ×{conc} {system} get: {evicted} blocks were evicted from the memory tier "
                                 "during the put/get cases, so some gets read from disk.")
                if mode in disk_modes:
                    progress.stage(f"{label} ×{conc} {system} put (disk)")
                    results.append(pool.run(_case(plan, system, tag, "put (disk)", size, conc, "disk", "disk")))
                    progress.advance(plan.case_bytes(size, conc))
                    os.sync()
                admin.drop()  # each case starts from an empty namespace
        pool.close_driver()
    return results, notes, described


def run_peer(
    pool: WorkerPool, peer, plan: Plan, progress: Progress, *, warm: bool = True, repeats: int = 1
) -> tuple[list[Result], list[str]]:
    """Put and get through ``peer`` (started: its servers run) from the pool's processes, each case
    the best of ``repeats`` runs."""
    levels = [c for c in plan.levels if peer.max_clients is None or c <= peer.max_clients]
    notes = []
    skipped = [c for c in plan.levels if c not in levels]
    if skipped:
        notes.append(f"{peer.name}: {', '.join(map(str, skipped))} clients not run: it takes at most "
                     f"{peer.max_clients} client(s) per store.")
    tag = "".join(ch for ch in peer.name if ch.isalnum())[:10]
    results = []
    try:
        client = peer.client_spec()
    except NotImplementedError as exc:
        return [], [f"{peer.name}: not run: {exc}"]
    pool.open({"kind": "peer", "client": client})
    try:
        if warm and levels:
            warmed = warm_up(pool, plan, peer.name, tag, progress, max(levels))
            peer.clear()
            notes.append(f"{peer.name}: before the timed cases, {size_label(warmed.nbytes)} of "
                         f"{size_label(warmed.block_size)} blocks were put once and removed, unmeasured "
                         f"(it ran at {rate(warmed.gbps)} GB/s).")
        for size in plan.sizes:
            label = size_label(size)
            pool.prepare(size, plan.batch, plan.dst_blocks(size, levels))
            for conc in levels:
                for run in runs(repeats):
                    for op in ("put", "get"):
                        progress.stage(f"{label} ×{conc} {peer.name} {op}{run}")
                        results.append(pool.run(_case(plan, peer.name, tag, op, size, conc, "put")))
                        progress.advance(plan.case_bytes(size, conc))
                    peer.clear()
    finally:
        pool.close_driver()
    return best_runs(results), notes


def check_sizes(plan: Plan, daemon_memory: int) -> None:
    """The daemon keeps a whole put case in its memory tier for the get case after it."""
    need = plan.largest_case()
    if need > daemon_memory * 0.9:
        raise BenchError(
            f"the largest case moves {size_label(need)} but the daemon's memory tier is "
            f"{size_label(daemon_memory)}: raise --daemon-memory or lower --volume/--batch"
        )
