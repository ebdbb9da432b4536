"""The replica engines: one batch against the replicas of its keys, resumed when
a daemon fails under it.

``write`` sends every key to its R owners in parallel and succeeds once W of
them hold it; ``read`` asks a key's owners in ring order until one has it. A
sub-batch whose daemon dies, resets the connection, fails its data-plane
endpoint or misses its attempt deadline is re-issued to the next node of the
key's ring order; a daemon that answers WRONG_NODE makes the engine refresh
the map (``Planner.refresh``) and plan the keys again. The caller sees an
error only when no replica could serve a key within the deadline and the
retry policy.

The engines know nothing of RPCs: a ``Planner`` says where each key goes (a
``Plan`` per key) and ``send(node, positions, timeout)`` does one sub-batch's
RPC for the keys at ``positions``, returning one result per position (for
reads, None is a miss). Errors name the caller's entry: a batch that is part
of a larger call passes its ``start``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, NamedTuple, Protocol, Sequence

from kvstore import errors
from kvstore.client.config import Deadline, RetryPolicy
from kvstore.client.router import DownNodes
from kvstore.protocol.codes import ErrorCode

log = logging.getLogger("kvstore.client")

Send = Callable[[str, list[int], float], Awaitable[list[Any]]]


class Plan(NamedTuple):
    """Where one key's request goes (a named tuple: one is made per key of every call).

    ``order``: nodes in the order to try (owners first, then the nodes of the
    ring that stand in for failed ones); ``count``: how many of them to use
    when all answer (writes: the replicas; reads: the owners, then previous
    owners while blocks move); ``quorum``: how many must hold a write."""

    order: Sequence[str]
    count: int
    quorum: int = 0


class Planner(Protocol):
    def write_plan(self, key: bytes) -> Plan: ...

    def read_plan(self, key: bytes) -> Plan: ...

    async def refresh(self) -> None:
        """Re-read the cluster map (a daemon said the keys are not its own)."""


@dataclass
class Call:
    """What one SDK call may spend, and the down-node marks its batches share."""

    deadline: Deadline
    retry: RetryPolicy
    down: DownNodes
    concurrency: int
    started: float = field(default_factory=time.monotonic)

    def attempt_timeout(self) -> float:
        left = self.deadline.total - (time.monotonic() - self.started)
        if left <= 0:
            raise errors.DeadlineExceededError(f"the call ran past its {self.deadline.total:g}s deadline")
        return min(self.deadline.attempt, left)

    async def backoff(self, attempt: int) -> bool:
        """Wait before retry round ``attempt``; False when the policy or deadline says stop."""
        if attempt > self.retry.attempts:
            return False
        delay = self.retry.delay(attempt)
        if time.monotonic() - self.started + delay >= self.deadline.total:
            return False
        await asyncio.sleep(delay)
        return True


@dataclass
class ReadResult:
    values: list[Any]
    # Per key, the owners that answered "not here": candidates for read repair.
    missed_on: list[list[str]]


async def _send_all(call: Call, batches: dict[str, list[int]], send: Send) -> list[tuple[str, list[int], Any]]:
    gate = asyncio.Semaphore(call.concurrency)

    async def one(node: str, positions: list[int]):
        async with gate:
            try:
                return node, positions, await send(node, positions, call.attempt_timeout())
            except errors.KVStoreError as exc:
                return node, positions, exc

    if len(batches) == 1:  # one node (a cluster of one, mostly): no task to create and schedule
        ((node, positions),) = batches.items()
        return [await one(node, positions)]
    return await asyncio.gather(*(one(node, positions) for node, positions in batches.items()))


def _failed(call: Call, node: str, exc: errors.KVStoreError, positions: list[int], start: int) -> None:
    """Note a failed sub-batch; raise unless another node may do better."""
    if isinstance(exc, errors.DataCorruptionError):
        return  # this replica's bytes arrived corrupt twice: another replica may be good
    if not exc.retryable:
        if 0 <= exc.index < len(positions):  # entry j of the sub-batch: the caller's entry
            exc.index = start + positions[exc.index]
        raise exc
    if not isinstance(exc, errors.WrongNodeError):
        call.down.mark(node)
    log.debug("%d keys failed on %s: %s; moving on", len(positions), node, exc)


async def write(keys: Sequence[bytes], planner: Planner, send: Send, call: Call, start: int = 0) -> None:
    """Store ``keys`` on their owners; raise unless each reached its write quorum."""
    count = len(keys)
    plans = [planner.write_plan(key) for key in keys]
    stored: list[set[str]] = [set() for _ in range(count)]
    tried: list[set[str]] = [set() for _ in range(count)]
    last: list[errors.KVStoreError | None] = [None] * count
    why: list[dict[str, str]] = [{} for _ in range(count)]  # node -> its last failure, for the error
    attempt = 1
    while True:
        batches: dict[str, list[int]] = defaultdict(list)
        for i, plan in enumerate(plans):
            want = plan.count - len(stored[i])
            if want <= 0:
                continue
            ordered = call.down.prefer_up(plan.order)
            for node in [n for n in ordered if n not in tried[i]][:want]:
                batches[node].append(i)
                tried[i].add(node)
        if not batches:
            short = [i for i in range(count) if len(stored[i]) < plans[i].quorum]
            if not short:
                return
            attempt += 1
            if not await call.backoff(attempt):
                i = short[0]
                cause = last[i]
                failures = "; ".join(f"{node}: {message}" for node, message in why[i].items())
                raise errors.UnavailableError(
                    f"block {start + i} reached {len(stored[i])} of the {plans[i].quorum} replicas its write needs"
                    f" (stored on {', '.join(sorted(stored[i])) or 'none'}; {failures})",
                    code=cause.code if cause else ErrorCode.ERROR_CODE_UNSPECIFIED,
                    index=start + i,
                ) from cause
            for i in short:
                tried[i] = set(stored[i])
            continue
        refreshed = False
        for node, positions, outcome in await _send_all(call, batches, send):
            if not isinstance(outcome, errors.KVStoreError):
                call.down.clear(node)
                for i in positions:
                    stored[i].add(node)
                continue
            _failed(call, node, outcome, positions, start)
            for i in positions:
                last[i] = outcome
                why[i][node] = outcome.message
            if isinstance(outcome, errors.WrongNodeError):
                if not refreshed:
                    await planner.refresh()
                    refreshed = True
                for i in positions:
                    plans[i] = planner.write_plan(keys[i])


async def read(
    keys: Sequence[bytes], planner: Planner, send: Send, call: Call, *, failures_as_miss: bool, start: int = 0
) -> ReadResult:
    """Ask each key's nodes in turn until one has it, standing in the next
    nodes of the ring for failed ones."""
    count = len(keys)
    plans = [planner.read_plan(key) for key in keys]
    # First round: nodes known to be down yield their turn to the next nodes of
    # the ring; the key counts as not fully asked (failed) until a retry round,
    # which asks in plain ring order, reaches them.
    orders = [call.down.prefer_up(plan.order) for plan in plans]
    limits = [plan.count for plan in plans]
    cursor = [0] * count
    if call.down.any_marked():
        failed = [any(call.down.is_down(n) for n in plan.order[: plan.count]) for plan in plans]
    else:
        failed = [False] * count
    done = [False] * count
    values: list[Any] = [None] * count
    missed: list[list[str]] = [[] for _ in range(count)]
    last: list[errors.KVStoreError | None] = [None] * count
    attempt = 1
    while True:
        batches: dict[str, list[int]] = defaultdict(list)
        for i in range(count):
            if done[i]:
                continue
            if cursor[i] < min(limits[i], len(orders[i])):
                batches[orders[i][cursor[i]]].append(i)
            elif not failed[i]:
                done[i] = True  # every node worth asking answered: a miss
                log.debug("key %d: a miss on %s", start + i, ", ".join(missed[i]))
        if not batches:
            unresolved = [i for i in range(count) if not done[i]]
            if not unresolved:
                return ReadResult(values, missed)
            attempt += 1
            if not await call.backoff(attempt):
                if failures_as_miss:
                    log.warning("%d keys unreadable on every replica; answering misses", len(unresolved))
                    return ReadResult(values, missed)
                i = unresolved[0]
                cause = last[i]
                raise errors.UnavailableError(
                    f"block {start + i}: no replica answered" + (f": {cause.message}" if cause else ""),
                    code=cause.code if cause else ErrorCode.ERROR_CODE_UNSPECIFIED,
                    index=start + i,
                ) from cause
            for i in unresolved:
                # A node that held the key failed: this time ask every node the
                # plan names, in plain ring order (a map in flux may not name
                # the holder among the first).
                orders[i] = plans[i].order
                cursor[i], limits[i], failed[i] = 0, len(plans[i].order), False
            continue
        for node, positions, outcome in await _send_all(call, batches, send):
            if isinstance(outcome, errors.KVStoreError):
                _failed(call, node, outcome, positions, start)
                for i in positions:
                    cursor[i] += 1
                    limits[i] += 1  # the next node of the ring stands in
                    failed[i] = True
                    last[i] = outcome
                continue
            call.down.clear(node)
            for i, value in zip(positions, outcome):
                if value is None:
                    missed[i].append(node)
                    cursor[i] += 1
                else:
                    values[i] = value
                    done[i] = True
