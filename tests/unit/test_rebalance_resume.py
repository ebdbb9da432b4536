"""A rebalance pass interrupted by a crash resumes where it stopped."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.checksum import checksum
from kvstore.namespace import Namespace
from kvstore.replication import Replication
from kvstore.server.cluster import rebalance
from kvstore.server.cluster.membership import Member, MemberList
from kvstore.server.cluster.peers import Peers
from kvstore.server.cluster.rebalance import Rebalancer
from kvstore.server.cluster.state import ClusterState
from kvstore.server.storage.store import BlockIn, BlockStore


class Crash(Exception):
    pass


async def _scenario(tmp_path, monkeypatch) -> tuple[int, int, list[int]]:
    monkeypatch.setattr(rebalance, "PAGE_KEYS", 10)
    store = BlockStore(tmp_path / "data", memory_bytes=8 << 20, segment_size=1 << 20, sync_window=0, io_threads=2)
    ns = Namespace("t", "s")
    blocks = [BlockIn(ns.storage_key(b"k%03d" % i), b"v", 1, checksum(b"v")) for i in range(95)]
    await store.put(ns, blocks, "disk")
    members = MemberList.of([Member("me", "127.0.0.1:1"), Member("peer", "127.0.0.1:2")])
    pages: list[int] = []

    def make() -> Rebalancer:
        cluster = ClusterState("me", "127.0.0.1:1", members, Replication.of(1), vnodes=16, data_dir=tmp_path / "data")
        cluster.update(members)
        return Rebalancer(cluster, store, rate=1 << 30, interval=60, data_dir=tmp_path / "data", peers=Peers(1 << 20))

    async def settle(self, ns, keys):
        pages.append(len(keys))
        if len(pages) == 4:
            raise Crash  # the process dies in the middle of the walk
        return True

    monkeypatch.setattr(Rebalancer, "_settle_page", settle)
    try:
        with pytest.raises(Crash):
            await make().run_pass()
        first = sum(pages[:3])  # pages that were finished before the crash
        restarted = make()
        assert await restarted.run_pass() is True
        resumed = restarted.status.keys_scanned
        # The next pass (nothing interrupted it) walks everything again.
        again = make()
        await again.run_pass()
        return first, resumed, [again.status.keys_scanned, again.status.keys_total]
    finally:
        await store.close()


def test_an_interrupted_pass_resumes_after_the_last_finished_page(tmp_path, monkeypatch):
    first, resumed, full = asyncio.run(_scenario(tmp_path, monkeypatch))
    assert first == 30
    assert resumed == 95 - 30  # the crashed page is walked again, the finished ones are not
    assert full == [95, 95]
