"""The client's routing (client/router.py): per key, the nodes to write and to
read, as the daemons' ring places them."""

from __future__ import annotations

import time

from kvstore._proto.v1 import cluster_pb2, data_pb2
from kvstore.client.router import STAND_INS, ClusterView, DownNodes
from kvstore.replication import Replication
from kvstore.ring import Ring

KEYS = [b"key-%d" % i for i in range(200)]


def cluster_map(nodes, *, replicas=1, quorum=1, previous=(), policies=()) -> cluster_pb2.ClusterMap:
    return cluster_pb2.ClusterMap(
        epoch=7,
        nodes=[cluster_pb2.Node(node_id=n, address=f"127.0.0.1:{7600 + i}", weight=1.0) for i, n in enumerate(nodes)],
        previous_nodes=[cluster_pb2.Node(node_id=n, address=f"10.0.0.{i}:7600", weight=1.0) for i, n in enumerate(previous)],
        replicas=replicas,
        write_quorum=quorum,
        policies=[
            cluster_pb2.NamespacePolicy(namespace=data_pb2.Namespace(tenant=t, subtenant=s), replicas=r, write_quorum=w)
            for (t, s), (r, w) in dict(policies).items()
        ],
    )


def test_a_cluster_of_one_sends_every_key_to_its_node():
    view = ClusterView(cluster_map(["solo"], replicas=3, quorum=2))
    for key in KEYS:
        assert view.write_order("t", "s", key) == (["solo"], 1)
        assert view.read_order("t", "s", key) == (["solo"], 1)
    assert view.replication("t", "s") == Replication(1, 1)  # never more replicas than nodes


def test_a_cluster_of_one_that_replaced_another_still_reads_the_previous_owner():
    view = ClusterView(cluster_map(["new"], previous=["old"]))
    order, asked = view.read_order("t", "s", b"k")
    assert order == ["new", "old"] and asked == 2
    assert view.write_order("t", "s", b"k") == (["new"], 1)


def test_orders_follow_the_ring_with_stand_ins():
    nodes = [f"n{i}" for i in range(6)]
    view = ClusterView(cluster_map(nodes, replicas=2, quorum=2))
    ring = Ring({n: 1.0 for n in nodes})
    for key in KEYS:
        order, owners = view.write_order("t", "s", key)
        assert owners == 2 and order == ring.owners("t", "s", key, 2 + STAND_INS)
        assert view.read_order("t", "s", key) == (order, 2)


def test_namespace_policies_override_the_default_and_are_capped_by_the_cluster_size():
    nodes = ["a", "b", "c"]
    view = ClusterView(cluster_map(nodes, replicas=1, quorum=1, policies={("t", "wide"): (5, 4), ("t", "two"): (2, 1)}))
    assert view.replication("t", "s") == Replication(1, 1)
    assert view.replication("t", "two") == Replication(2, 1)
    assert view.replication("t", "wide") == Replication(3, 3)
    assert view.replication("t", "two") is view.replication("t", "two")  # computed once per namespace
    assert view.write_order("t", "wide", b"k")[1] == 3


def test_down_nodes_move_to_the_end_for_their_hold_only():
    down = DownNodes(hold=0.05)
    nodes = ["a", "b", "c"]
    assert not down.any_marked() and down.prefer_up(nodes) == nodes
    down.mark("a")
    assert down.any_marked() and down.is_down("a") and not down.is_down("b")
    assert down.prefer_up(nodes) == ["b", "c", "a"]
    assert nodes == ["a", "b", "c"]  # the caller's list is left alone
    time.sleep(0.06)
    assert down.prefer_up(nodes) == nodes  # the hold expired
    assert not down.any_marked()  # and was forgotten on the way
    down.mark("b")
    down.clear("b")
    assert not down.any_marked() and down.prefer_up(nodes) == nodes
