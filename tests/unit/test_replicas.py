"""The replica engines (client/replicas.py) against a fake send: write quorum,
stand-ins for failed owners, errors naming the caller's entry, attempt
deadlines, read failures as misses or errors, and re-planning on WRONG_NODE."""

from __future__ import annotations

import asyncio

import pytest

from kvstore import errors
from kvstore.client import replicas
from kvstore.client.config import Deadline, RetryPolicy
from kvstore.client.replicas import Call, Plan
from kvstore.client.router import DownNodes
from kvstore.protocol.codes import ErrorCode

pytestmark = pytest.mark.timeout(30)

NODES = ["a", "b", "c", "d", "e"]


class Planner:
    """Every key's order is the same ring walk from ``first``; ``moved`` after a refresh."""

    def __init__(self, replicas: int = 3, quorum: int = 2, order=NODES, after_refresh=None) -> None:
        self.replicas, self.quorum = replicas, quorum
        self.order, self.after_refresh = list(order), after_refresh
        self.refreshes = 0

    def write_plan(self, key: bytes) -> Plan:
        return Plan(self.order, self.replicas, self.quorum)

    def read_plan(self, key: bytes) -> Plan:
        return Plan(self.order, self.replicas)

    async def refresh(self) -> None:
        self.refreshes += 1
        if self.after_refresh is not None:
            self.order = list(self.after_refresh)


class FakeSend:
    """Records every sub-batch; ``behaviour[node]`` is an exception to raise, a
    coroutine function to await, or a dict key index -> value for reads."""

    def __init__(self, behaviour=None, values=None) -> None:
        self.behaviour = dict(behaviour or {})
        self.values = values or {}  # node -> {position: value} for reads
        self.sent: list[tuple[str, list[int], float]] = []

    async def __call__(self, node: str, positions: list[int], timeout: float):
        self.sent.append((node, list(positions), timeout))
        action = self.behaviour.get(node)
        if isinstance(action, BaseException):
            raise action
        if callable(action):
            await action()
        if not self.values:  # a write
            return [True] * len(positions)
        held = self.values.get(node, {})
        return [held.get(p) for p in positions]

    def nodes_of(self, position: int) -> list[str]:
        return [node for node, positions, _ in self.sent if position in positions]


def call(total: float = 5.0, attempt: float = 1.0, attempts: int = 3) -> Call:
    return Call(
        deadline=Deadline(total, attempt), retry=RetryPolicy(attempts=attempts, backoff=0.001), down=DownNodes(), concurrency=8
    )


def unavailable(node: str) -> errors.UnavailableError:
    return errors.UnavailableError(f"{node} is down")


# -- writes --------------------------------------------------------------------


async def test_a_write_goes_to_the_owners_and_is_done_at_the_quorum():
    send = FakeSend()
    await replicas.write([b"k0", b"k1"], Planner(), send, call())
    assert sorted(node for node, _, _ in send.sent) == ["a", "b", "c"]
    assert all(positions == [0, 1] for _, positions, _ in send.sent)


async def test_a_failed_owner_is_stood_in_for_by_the_next_node_of_the_ring():
    send = FakeSend({"b": unavailable("b")})
    c = call()
    await replicas.write([b"k0"], Planner(), send, c)
    assert send.nodes_of(0) == ["a", "b", "c", "d"]
    assert c.down.is_down("b") and not c.down.is_down("d")


async def test_a_write_short_of_its_quorum_raises_naming_the_callers_entry():
    down = {n: unavailable(n) for n in NODES[1:]}
    with pytest.raises(errors.UnavailableError) as info:
        await replicas.write([b"k0", b"k1"], Planner(), FakeSend(down), call(attempts=2), start=40)
    exc = info.value
    assert exc.index == 40 and "block 40 reached 1 of the 2 replicas" in exc.message
    assert exc.message.count("is down") == 4 and isinstance(exc.__cause__, errors.UnavailableError)


class SplitPlanner(Planner):
    """Even keys are owned by "a", odd keys by "b"."""

    def write_plan(self, key: bytes) -> Plan:
        return Plan(["a", "c"] if int(key[1:]) % 2 == 0 else ["b", "c"], 1, 1)


async def test_a_bad_entry_is_raised_at_once_with_the_index_the_caller_gave_it():
    """Entry 1 of "b"'s sub-batch [1, 3, 5] is the chunk's key 3, which is entry 103 of the call."""
    send = FakeSend({"b": errors.InvalidArgumentError("block 1 is too big", code=ErrorCode.VALUE_TOO_LARGE, index=1)})
    with pytest.raises(errors.InvalidArgumentError) as info:
        await replicas.write([b"k%d" % i for i in range(6)], SplitPlanner(), send, call(), start=100)
    assert (info.value.index, info.value.code) == (103, ErrorCode.VALUE_TOO_LARGE)
    assert ("b", [1, 3, 5]) in [(node, positions) for node, positions, _ in send.sent]
    assert send.nodes_of(3) == ["b"]  # a request that is wrong is not sent to a stand-in


async def test_wrong_node_refreshes_the_map_once_and_replans_the_keys():
    send = FakeSend({"a": errors.WrongNodeError("not mine"), "b": errors.WrongNodeError("not mine")})
    planner = Planner(replicas=2, quorum=2, after_refresh=["d", "e", "a"])
    await replicas.write([b"k0", b"k1"], planner, send, call())
    assert planner.refreshes == 1
    assert {node for node, _, _ in send.sent} == {"a", "b", "d", "e"}
    assert send.nodes_of(0)[-2:] in (["d", "e"], ["e", "d"])


async def test_an_owner_that_does_not_answer_in_its_attempt_time_is_stood_in_for():
    asked: list[tuple[str, float]] = []

    async def send(node, positions, timeout):
        asked.append((node, timeout))
        if node == "a":  # frozen: only the attempt timeout ends the wait
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.Event().wait()
            except TimeoutError:
                raise errors.DeadlineExceededError("a: no answer") from None
        return [True] * len(positions)

    c = call(total=30.0, attempt=0.05)
    await replicas.write([b"k0"], Planner(replicas=1, quorum=1), send, c)
    assert [node for node, _ in asked] == ["a", "b"]
    assert asked[0][1] == pytest.approx(0.05, abs=0.01)  # the attempt's share, not the call's 30 s
    assert c.down.is_down("a")


async def test_a_call_past_its_deadline_sends_nothing_more():
    c = call(total=0.01)
    await asyncio.sleep(0.02)
    send = FakeSend()
    with pytest.raises(errors.UnavailableError) as info:
        await replicas.write([b"k0"], Planner(), send, c)
    assert isinstance(info.value.__cause__, errors.DeadlineExceededError) and "deadline" in info.value.message
    assert send.sent == []


# -- reads ---------------------------------------------------------------------


async def test_a_read_asks_owners_in_order_until_one_has_the_key():
    send = FakeSend(values={"a": {}, "b": {0: b"v0"}, "c": {0: b"v0", 1: b"v1"}})
    result = await replicas.read([b"k0", b"k1"], Planner(), send, call(), failures_as_miss=True)
    assert result.values == [b"v0", b"v1"]
    assert result.missed_on == [["a"], ["a", "b"]]  # candidates for read repair
    assert send.nodes_of(0) == ["a", "b"] and send.nodes_of(1) == ["a", "b", "c"]


async def test_a_key_no_owner_has_is_a_miss_without_asking_stand_ins():
    send = FakeSend(values={n: {} for n in NODES})
    result = await replicas.read([b"k0"], Planner(), send, call(), failures_as_miss=False)
    assert result.values == [None] and send.nodes_of(0) == ["a", "b", "c"]


async def test_a_failed_owner_is_stood_in_for_and_its_key_counts_as_not_fully_asked():
    send = FakeSend({"a": unavailable("a")}, values={"a": {}, "b": {}, "c": {}, "d": {0: b"v"}, "e": {}})
    result = await replicas.read([b"k0"], Planner(), send, call(), failures_as_miss=False)
    assert result.values == [b"v"] and send.nodes_of(0) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("failures_as_miss", [True, False])
async def test_read_failures_are_misses_or_errors_as_configured(failures_as_miss):
    send = FakeSend({n: unavailable(n) for n in NODES}, values={n: {} for n in NODES})
    outcome = replicas.read([b"k0", b"k1"], Planner(), send, call(attempts=2), failures_as_miss=failures_as_miss, start=7)
    if failures_as_miss:
        assert (await outcome).values == [None, None]
    else:
        with pytest.raises(errors.UnavailableError) as info:
            await outcome
        assert info.value.index == 7 and info.value.message.startswith("block 7: no replica answered: ")
    assert len(send.sent) > len(NODES)  # a second round asked again


async def test_corrupt_bytes_from_one_replica_move_the_read_to_the_next():
    send = FakeSend({"a": errors.DataCorruptionError("twice", index=0)}, values={"a": {}, "b": {0: b"good"}, "c": {}})
    c = call()
    result = await replicas.read([b"k0"], Planner(), send, c, failures_as_miss=False)
    assert result.values == [b"good"] and not c.down.is_down("a")
