"""EtcdMembership against a real etcd (started per test on free ports): members
find each other with one epoch, leave at once on stop and after the TTL on a
crash, keep their list while etcd is away and re-register when it is back,
and share namespace policies."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from aetcd import rpc

from kvstore.backoff import Backoff
from kvstore.errors import InvalidArgumentError, UnavailableError
from kvstore.server.cluster.etcd import EtcdMembership
from kvstore.server.cluster.membership import Member, MemberList
from tests.conftest import wait_for
from tests.etcd_server import etcd_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(60)

TTL = 2.0  # seconds; etcd's floor with its default election timeout is 1.5
FAST = Backoff(initial=0.05, cap=0.3)


class Node:
    """One EtcdMembership and every list it reported."""

    def __init__(self, endpoints, node_id: str, prefix: str, **kwargs) -> None:
        kwargs.setdefault("ttl", TTL)
        kwargs.setdefault("backoff", FAST)
        self.member = Member(node_id, f"127.0.0.1:{7600 + len(node_id)}", 1.0)
        self.membership = EtcdMembership(endpoints, self.member, prefix=prefix, **kwargs)
        self.changes: list[MemberList] = []
        self.policy_tables: list[dict] = []

    async def start(self) -> MemberList:
        return await self.membership.start(self.changes.append, self.policy_tables.append)

    @property
    def current(self) -> MemberList:
        return self.membership.current()

    @property
    def ids(self) -> tuple[str, ...]:
        return self.current.node_ids


def agreed(nodes, ids) -> bool:
    lists = [n.current for n in nodes]
    return all(lst.node_ids == tuple(ids) for lst in lists) and len({lst.epoch for lst in lists}) == 1


@pytest.fixture
def prefix():
    return f"/kvstore/test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def cluster(etcd_server, prefix):  # noqa: F811
    """Three members a, b, c on one etcd, stopped (revoked) at the end."""
    nodes = [Node([etcd_server.endpoint], name, prefix) for name in ("a", "b", "c")]
    for node in nodes:
        await node.start()
    await wait_for(lambda: agreed(nodes, "abc"), 5, "a, b, c agree on the list")
    yield nodes
    for node in nodes:
        await node.membership.stop()


async def test_members_see_each_other_with_one_epoch(cluster):
    a, b, c = cluster
    assert a.current.members == (a.member, b.member, c.member)
    assert a.current == b.current == c.current
    assert all(n.membership.status()["connected"] for n in cluster)
    # Every change reached every member, newest last, epochs increasing.
    for node in (a, b):
        epochs = [lst.epoch for lst in node.changes]
        assert epochs == sorted(set(epochs)), epochs


async def test_stop_is_seen_at_once_and_bumps_the_epoch(cluster):
    a, b, c = cluster
    before = a.current.epoch
    await c.membership.stop()
    took = await wait_for(lambda: agreed([a, b], "ab"), 2, "a and b drop c")
    assert took < 1.0
    assert a.current.epoch > before
    assert a.current == b.current


async def test_crashed_member_leaves_after_the_ttl(cluster):
    a, b, c = cluster
    before = a.current.epoch
    await c.membership.stop(revoke=False)  # as if the process died
    await asyncio.sleep(0.5)
    assert a.ids == ("a", "b", "c"), "dropped before the lease could expire"
    took = await wait_for(lambda: agreed([a, b], "ab"), TTL + 3, "a and b drop crashed c")
    assert took + 0.5 <= TTL + 2.5
    assert a.current.epoch > before


async def test_rejoin_after_the_lease_is_lost(cluster, etcd_server):  # noqa: F811
    a, b, c = cluster
    before = a.current.epoch
    lease_id = c.membership.status()["lease_id"]
    channel = grpc.aio.insecure_channel(etcd_server.endpoint)
    try:
        await rpc.LeaseStub(channel).LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), timeout=5)
    finally:
        await channel.close()

    def gone() -> bool:
        return any(lst.node_ids == ("a", "b") and lst.epoch > before for lst in a.changes)

    await wait_for(gone, 2, "a sees c's key go")
    await wait_for(lambda: agreed([a, b, c], "abc"), TTL + 2, "c registers again on a new lease")
    assert c.membership.status()["lease_id"] not in (0, lease_id)
    assert a.current.epoch > before


async def test_etcd_down_keeps_the_list_and_restart_rejoins(cluster, etcd_server):  # noqa: F811
    a = cluster[0]
    before = a.current
    seen = [len(n.changes) for n in cluster]
    etcd_server.stop()
    await wait_for(lambda: not any(n.membership.status()["connected"] for n in cluster), 3, "all notice etcd is gone")
    assert all(n.membership.status()["last_error"] for n in cluster)
    with pytest.raises(UnavailableError):
        await a.membership.put_policy("t", "s", {"replicas": 1})
    await asyncio.sleep(TTL + 0.5)  # longer than any lease: the lists must not shrink
    assert all(n.current == before for n in cluster)
    assert [len(n.changes) for n in cluster] == seen, "no list reported while etcd was down"

    etcd_server.start()  # same ports, same data dir
    await wait_for(lambda: all(n.membership.status()["connected"] for n in cluster), 8, "all reconnect")
    await wait_for(lambda: agreed(cluster, "abc"), 5, "all agree again")
    assert a.current.epoch >= before.epoch
    for node, count in zip(cluster, seen):
        assert all(len(lst.members) == 3 for lst in node.changes[count:]), node.changes
    # Under load: a member joins right after the restart and everyone sees it.
    d = Node([etcd_server.endpoint], "d", a.membership.prefix)
    await d.start()
    try:
        await wait_for(lambda: agreed(cluster + [d], "abcd"), 3, "d joins after the restart")
    finally:
        await d.membership.stop()


async def test_frozen_etcd_is_noticed_by_timeouts(cluster, etcd_server):  # noqa: F811
    before = cluster[0].current
    etcd_server.pause()
    try:
        await wait_for(lambda: not any(n.membership.status()["connected"] for n in cluster), TTL + 3,
                       "all notice etcd stopped answering")  # fmt: skip
        assert all(n.current == before for n in cluster)
    finally:
        etcd_server.resume()
    await wait_for(lambda: all(n.membership.status()["connected"] for n in cluster), 10, "all reconnect")
    await wait_for(lambda: agreed(cluster, "abc"), 5, "all agree again")


async def test_policies_reach_every_member(cluster):
    a, b, c = cluster
    assert a.policy_tables == [{}]  # the initial table
    await a.membership.put_policy("acme", "llama-70b", {"replicas": 2, "write_quorum": 1})
    await wait_for(lambda: b.policy_tables[-1] == {("acme", "llama-70b"): {"replicas": 2, "write_quorum": 1}},
                   2, "b sees the policy")  # fmt: skip
    assert await c.membership.policies() == {("acme", "llama-70b"): {"replicas": 2, "write_quorum": 1}}
    # A member that starts later reads the table at start.
    d = Node(a.membership.endpoints, "d", a.membership.prefix)
    await d.start()
    try:
        assert d.policy_tables == [{("acme", "llama-70b"): {"replicas": 2, "write_quorum": 1}}]
    finally:
        await d.membership.stop()
    await b.membership.delete_policy("acme", "llama-70b")
    await wait_for(lambda: c.policy_tables[-1] == {}, 2, "c sees the deletion")
    assert await a.membership.policies() == {}
    with pytest.raises(InvalidArgumentError):
        await a.membership.put_policy("bad/tenant", "s", {"replicas": 1})
    # Policies never touch the member epoch.
    assert a.current == b.current


async def test_fails_over_to_the_next_endpoint(etcd_server, prefix):  # noqa: F811
    dead = TcpProxy.free_port()
    node = Node([f"127.0.0.1:{dead}", etcd_server.endpoint], "a", prefix)
    await asyncio.wait_for(node.start(), 5)
    try:
        status = node.membership.status()
        assert status["connected"] and status["endpoint"] == etcd_server.endpoint
        assert node.ids == ("a",)
    finally:
        await node.membership.stop()


async def test_start_gives_up_when_no_etcd_answers(prefix):
    node = Node([f"127.0.0.1:{TcpProxy.free_port()}"], "a", prefix, start_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="unreachable"):
        await node.start()
    assert time.monotonic() - started < 3


async def test_partitioned_member_agrees_on_the_epoch_after_healing(etcd_server, prefix):  # noqa: F811
    """a loses etcd, c leaves meanwhile and the history is compacted; back
    online, a lists again and must land on the same epoch as b."""
    proxy = await TcpProxy.start(etcd_server.client_port)
    a = Node([proxy.endpoint], "a", prefix)
    b = Node([etcd_server.endpoint], "b", prefix)
    c = Node([etcd_server.endpoint], "c", prefix)
    nodes = [a, b, c]
    try:
        for node in nodes:
            await node.start()
        await wait_for(lambda: agreed(nodes, "abc"), 5, "a, b, c agree")
        proxy.cut()
        await wait_for(lambda: not a.membership.status()["connected"], 3, "a notices the cut")
        await c.membership.stop()
        await wait_for(lambda: b.ids == ("a", "b"), 2, "b drops c")
        channel = grpc.aio.insecure_channel(etcd_server.endpoint)
        try:
            kv = rpc.KVStub(channel)
            head = (await kv.Range(rpc.RangeRequest(key=b"/"), timeout=5)).header.revision
            await kv.Compact(rpc.CompactionRequest(revision=head, physical=True), timeout=5)
        finally:
            await channel.close()
        assert a.ids == ("a", "b", "c")  # still the last list it had
        proxy.heal()
        await wait_for(lambda: agreed([a, b], "ab"), 5, "a and b agree after healing")
        # a watches again (past the compacted history): it sees the next change.
        await b.membership.put_policy("t", "s", {"replicas": 1})
        await wait_for(lambda: a.policy_tables[-1] == {("t", "s"): {"replicas": 1}}, 3, "a sees b's policy")
        assert a.membership.status()["connected"]
        assert a.current == b.current
    finally:
        for node in nodes:
            await node.membership.stop()
        await proxy.close()


async def test_lone_survivor_that_missed_a_departure_moves_to_a_newer_epoch(etcd_server, prefix):  # noqa: F811
    """No one watched c leave (a was cut off, the history is compacted): a
    still gives its shrunken list a newer epoch, and a newcomer agrees."""
    proxy = await TcpProxy.start(etcd_server.client_port)
    a = Node([proxy.endpoint], "a", prefix)
    c = Node([etcd_server.endpoint], "c", prefix)
    d = Node([etcd_server.endpoint], "d", prefix)
    try:
        await a.start()
        await c.start()
        await wait_for(lambda: agreed([a, c], "ac"), 5, "a and c agree")
        before = a.current.epoch
        proxy.cut()
        await wait_for(lambda: not a.membership.status()["connected"], 3, "a notices the cut")
        await c.membership.stop()
        channel = grpc.aio.insecure_channel(etcd_server.endpoint)
        try:
            kv = rpc.KVStub(channel)
            head = (await kv.Range(rpc.RangeRequest(key=b"/"), timeout=5)).header.revision
            await kv.Compact(rpc.CompactionRequest(revision=head, physical=True), timeout=5)
        finally:
            await channel.close()
        proxy.heal()
        await wait_for(lambda: a.ids == ("a",), 5, "a drops c after healing")
        assert a.current.epoch > before
        await d.start()
        await wait_for(lambda: agreed([a, d], "ad"), 3, "a and d agree")
    finally:
        for node in (a, c, d):
            await node.membership.stop()
        await proxy.close()


class TcpProxy:
    """A loopback TCP relay that can cut every connection and refuse new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.is_cut = False

    @staticmethod
    def free_port() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    @classmethod
    async def start(cls, target_port: int) -> TcpProxy:
        proxy = cls(target_port)
        proxy.server = await asyncio.start_server(proxy._accept, "127.0.0.1", 0)
        return proxy

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader, writer) -> None:
        if self.is_cut:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self.writers |= {writer, up_writer}
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):  # the loop closing ends a relay, quietly
            writer.close()

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def cut(self) -> None:
        self.is_cut = True
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    def heal(self) -> None:
        self.is_cut = False

    async def close(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()
