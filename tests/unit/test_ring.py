"""The placement ring: balance, minimal movement, the same owners in every
process, weights, replica sets, and input checks."""

import inspect
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstore.ring as ring_module
from kvstore.errors import ConfigError, InvalidArgumentError
from kvstore.ring import DEFAULT_VNODES, HASH_SPACE, Ring, placement_hash, vnode_position

NODES_100 = [f"node-{i:03d}" for i in range(100)]
TENANT, SUBTENANT = "acme", "llama-3-8b"

node_ids = st.text(alphabet="abcxyz0189-.:#", min_size=1, max_size=12)
node_sets = st.lists(node_ids, min_size=1, max_size=12, unique=True)
positions = st.integers(0, HASH_SPACE - 1)
fast = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module")
def ring100():
    return Ring(NODES_100)


def _keys(n: int, salt: str = "") -> list[bytes]:
    return [f"{salt}block-{i:08d}".encode() for i in range(n)]


# -- balance -----------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 100])
def test_balance_exact_from_arcs(n, ring100):
    ring = ring100 if n == 100 else Ring(NODES_100[:n])
    shares = ring.shares()
    assert set(shares) == set(NODES_100[:n])
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    assert max(shares.values()) * n <= 1.10
    assert min(shares.values()) * n >= 0.90


def test_balance_sampled_keys_match_the_arcs(ring100):
    # 400k keys: with 200k, sampling alone puts the busiest of 100 nodes ~5.5% over the mean.
    n = 400_000
    counts = Counter(ring100.primary(TENANT, SUBTENANT, key) for key in _keys(n))
    assert set(counts) == set(NODES_100)
    assert max(counts.values()) / (n / len(NODES_100)) <= 1.10
    # Each node's count agrees with its exact share within 5 binomial standard deviations.
    for node, share in ring100.shares().items():
        expected = n * share
        assert abs(counts[node] - expected) <= 5 * (expected * (1 - share)) ** 0.5, node


def test_every_node_gets_its_vnodes(ring100):
    assert all(ring100.vnode_count(node) == DEFAULT_VNODES for node in NODES_100)
    assert len(ring100._positions) == 100 * DEFAULT_VNODES
    assert list(ring100._positions) == sorted(ring100._positions)


# -- minimal movement -----------------------------------------------------------


def _owner_table(ring: Ring, keys: list[bytes]) -> list[list[str]]:
    return [ring.owners(TENANT, SUBTENANT, key, 3) for key in keys]


def _check_one_node_changed(small: list[list[str]], large: list[list[str]], changed: str, n: int) -> None:
    """``large`` is ``small``'s ring plus node ``changed``; ``n`` is the node count before the change."""
    for replicas in (1, 2, 3):
        moved = 0
        for before, after in zip(small, large):
            before, after = before[:replicas], after[:replicas]
            if before == after:
                continue
            # The set changes only by gaining `changed` where it now sits clockwise; the last owner drops off.
            assert changed in after and changed not in before, (before, after)
            assert [node for node in after if node != changed] == before[: replicas - 1], (before, after)
            moved += 1
        assert moved / (replicas * len(small)) <= 1.2 / n, replicas  # replica copies that move
        assert moved > 0


@pytest.mark.parametrize("n", [5, 10, 50])
def test_adding_or_removing_one_node_moves_only_its_keys(n):
    keys = _keys(20_000, salt=f"move{n}-")
    nodes = NODES_100[:n]
    base = Ring(nodes)
    grown = Ring([*nodes, "node-new"])
    shrunk = Ring(nodes[1:])
    # Exact primary movement: the keys that move are exactly the arcs the new (or removed) node owns.
    assert grown.shares()["node-new"] <= 1.2 / n
    assert base.shares()[nodes[0]] <= 1.2 / n
    base_table = _owner_table(base, keys)
    _check_one_node_changed(base_table, _owner_table(grown, keys), "node-new", n)
    _check_one_node_changed(_owner_table(shrunk, keys), base_table, nodes[0], n)


@fast
@given(nodes=node_sets, extra=node_ids, h=st.lists(positions, min_size=1, max_size=20), count=st.integers(1, 5))
def test_adding_a_node_only_inserts_it(nodes, extra, h, count):
    if extra in nodes:
        nodes.remove(extra)
    if not nodes:
        return
    small, large = Ring(nodes, vnodes=16), Ring([*nodes, extra], vnodes=16)
    for position in h:
        before, after = small.owners_of_hash(position, count), large.owners_of_hash(position, count)
        if extra in after:
            assert [node for node in after if node != extra] == before[: len(after) - 1]
        else:
            assert after == before


def test_exact_primary_movement_over_all_arcs():
    """Every position of either ring is checked: the primary changes only to the new node."""
    nodes = NODES_100[:8]
    base, grown = Ring(nodes, vnodes=200), Ring([*nodes, "node-new"], vnodes=200)
    moved = 0
    previous = 0
    # The owner is constant between consecutive points of the union, so checking at each point covers the ring.
    for point in sorted({*base._positions, *grown._positions}):
        before, after = base.owners_of_hash(point, 1), grown.owners_of_hash(point, 1)
        if before != after:
            assert after == ["node-new"]
            moved += point - previous
        previous = point
    last_before, last_after = base.owners_of_hash(HASH_SPACE - 1, 1), grown.owners_of_hash(HASH_SPACE - 1, 1)
    if last_before != last_after:
        moved += HASH_SPACE - previous
    assert moved / HASH_SPACE == pytest.approx(grown.shares()["node-new"], rel=1e-9)


# -- the same owners everywhere -------------------------------------------------

GOLDEN_KEYS = [b"block-0", b"block-1", b"block-2", b"\xff" * 16]


def _golden_table() -> dict:
    ring = Ring([f"node-{i}" for i in range(5)])
    weighted = Ring({"a": 1, "b": 2, "c": 0.5})
    return {
        "owners": [ring.owners("default", "default", key, 3) for key in GOLDEN_KEYS],
        "owners_ns": [ring.owners("acme", "llama-3-8b", key, 2) for key in GOLDEN_KEYS],
        "weighted": [weighted.owners_of_hash(h, 3) for h in (0, 1 << 63, HASH_SPACE - 1)],
        "hashes": [placement_hash(TENANT, SUBTENANT, key) for key in GOLDEN_KEYS],
    }


def test_golden_values():
    assert placement_hash("default", "default", b"block-0") == 9889684142021112801
    assert placement_hash("acme", "llama-3-8b", b"\x00" * 32) == 3974993183800250876
    # The documented encoding: length-prefixed tenant and subtenant, then the key.
    assert placement_hash("default", "default", b"block-0") == xxhash.xxh3_64_intdigest(b"\x07default\x07defaultblock-0")
    assert vnode_position("node-000", 0) == 13948497186977964549
    assert vnode_position("10.0.0.1:7600", 1999) == 352646357648934493
    table = _golden_table()
    assert table["owners"] == [
        ["node-2", "node-4", "node-1"],
        ["node-2", "node-3", "node-4"],
        ["node-0", "node-2", "node-1"],
        ["node-2", "node-3", "node-4"],
    ]
    assert table["owners_ns"] == [["node-2", "node-0"], ["node-2", "node-1"], ["node-1", "node-0"], ["node-2", "node-0"]]
    assert table["weighted"] == [["b", "a", "c"], ["c", "b", "a"], ["b", "a", "c"]]


def test_same_owners_in_another_process_without_numpy():
    """Another interpreter, other hash seeds, the pure-Python build: the same placement."""
    script = "\n".join(
        [
            "import json",
            "import kvstore.ring as ring_module",
            "from kvstore.ring import HASH_SPACE, Ring, placement_hash",
            "ring_module._np = None",
            f"GOLDEN_KEYS, TENANT, SUBTENANT = {GOLDEN_KEYS!r}, {TENANT!r}, {SUBTENANT!r}",
            inspect.getsource(_golden_table),
            "print(json.dumps(_golden_table()))",
        ]
    )
    expected = _golden_table()
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == expected


@pytest.mark.parametrize("weights", [None, {"a": 1, "b": 2.5, "c": 0.01, "d": 3}])
def test_numpy_and_pure_python_builds_agree(monkeypatch, weights):
    nodes = weights or NODES_100[:20]
    with_numpy = Ring(nodes, vnodes=300)
    monkeypatch.setattr(ring_module, "_np", None)
    without = Ring(nodes, vnodes=300)
    assert with_numpy._positions == without._positions
    assert with_numpy._owner_index == without._owner_index
    assert with_numpy == without


def test_vnode_collisions_keep_both_points_in_node_order(monkeypatch):
    monkeypatch.setattr(ring_module, "_xxh3", lambda data: 7 if data.endswith(b"#0") else xxhash.xxh3_64_intdigest(data))
    nodes = [f"n{i:02d}" for i in range(60)]
    for build_numpy in (True, False):
        if not build_numpy:
            monkeypatch.setattr(ring_module, "_np", None)
        ring = Ring(list(reversed(nodes)), vnodes=3)
        assert list(ring._positions[:60]) == [7] * 60 and list(ring._owner_index[:60]) == list(range(60))
        assert ring.owners_of_hash(7, 3) == ["n00", "n01", "n02"]


# -- weights ---------------------------------------------------------------------


def test_weight_two_gets_twice_the_keys():
    pair = Ring({"small": 1.0, "big": 2.0})
    assert (pair.vnode_count("small"), pair.vnode_count("big")) == (round(DEFAULT_VNODES / 1.5), round(DEFAULT_VNODES / 0.75))
    shares = pair.shares()
    assert shares["big"] / shares["small"] == pytest.approx(2.0, rel=0.10)
    counts = Counter(pair.primary(TENANT, SUBTENANT, key) for key in _keys(30_000, "w"))
    assert counts["big"] / counts["small"] == pytest.approx(2.0, rel=0.10)

    mixed = Ring({f"n{i:02d}": 1.0 + (i % 2) for i in range(40)})
    shares = mixed.shares()
    total_weight = sum(mixed.weight(node) for node in mixed.nodes)
    heavy = sum(s for node, s in shares.items() if mixed.weight(node) == 2.0) / 20
    light = sum(s for node, s in shares.items() if mixed.weight(node) == 1.0) / 20
    assert heavy / light == pytest.approx(2.0, rel=0.10)
    for node, share in shares.items():
        assert share / (mixed.weight(node) / total_weight) == pytest.approx(1.0, abs=0.15), node


@fast
@given(weights=st.dictionaries(node_ids, st.floats(1e-3, 1e3), min_size=1, max_size=8))
def test_placement_does_not_depend_on_the_order_nodes_come_in(weights):
    forward = Ring(weights, vnodes=50)
    backward = Ring(dict(reversed(list(weights.items()))), vnodes=50)
    assert forward == backward
    assert forward._positions == backward._positions and forward._owner_index == backward._owner_index


def test_vnode_counts_do_not_depend_on_the_order_weights_are_summed_in():
    # 0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1 in floating point; with vnodes=5 a plain sum() flips a count.
    forward = Ring({"a": 0.1, "b": 0.2, "c": 0.3}, vnodes=5)
    backward = Ring({"c": 0.3, "b": 0.2, "a": 0.1}, vnodes=5)
    assert [forward.vnode_count(n) for n in "abc"] == [backward.vnode_count(n) for n in "abc"]


def test_weights_are_relative_and_tiny_weights_keep_one_point():
    assert Ring({"a": 3, "b": 3}, vnodes=10).vnode_count("a") == 10
    tiny = Ring({"a": 1.0, "b": 1e-9}, vnodes=10)
    assert tiny.vnode_count("b") == 1 and tiny.weight("b") == 1e-9
    assert "b" in {tiny.owners_of_hash(h, 1)[0] for h in tiny._positions}
    # A node with one point among thousands still shows up when every node is asked for.
    many = Ring({**{f"n{i:02d}": 1.0 for i in range(20)}, "tiny": 1e-9}, vnodes=200)
    for h in (0, 1 << 62, 1 << 63, HASH_SPACE - 1):
        assert sorted(many.owners_of_hash(h, 21)) == sorted(many.nodes)


# -- replica sets ------------------------------------------------------------------


@fast
@given(nodes=node_sets, h=positions, count=st.integers(1, 15), vnodes=st.integers(1, 40))
def test_owners_are_distinct_prefix_consistent_and_deterministic(nodes, h, count, vnodes):
    ring = Ring(nodes, vnodes=vnodes)
    owners = ring.owners_of_hash(h, count)
    assert len(owners) == min(count, len(nodes))
    assert len(set(owners)) == len(owners) and set(owners) <= set(nodes)
    assert owners == Ring(list(reversed(nodes)), vnodes=vnodes).owners_of_hash(h, count)
    assert ring.owners_of_hash(h, count + 1)[:count] == owners


@fast
@given(nodes=node_sets, vnodes=st.integers(1, 30), data=st.data())
def test_a_point_owns_the_arc_up_to_and_including_it(nodes, vnodes, data):
    ring = Ring(nodes, vnodes=vnodes)
    points, owners = ring._positions, ring._owner_index
    j = data.draw(st.integers(0, len(points) - 1))
    owner = ring.nodes[owners[j]]
    assert ring.owners_of_hash(points[j], 1) == [owner]
    if j and points[j - 1] != points[j]:
        assert ring.owners_of_hash(points[j - 1] + 1, 1) == [owner]
    if j == 0:  # clockwise wraps from the end of the hash space to the first point
        assert ring.owners_of_hash(HASH_SPACE - 1, 1) == [owner] or points[-1] == HASH_SPACE - 1
        assert ring.owners_of_hash(0, 1) == [owner]
    # The replica walk follows the points clockwise, skipping nodes already taken.
    walk = []
    for step in range(len(points)):
        node = ring.nodes[owners[(j + step) % len(points)]]
        if node not in walk:
            walk.append(node)
    if j == 0 or points[j - 1] != points[j]:
        assert ring.owners_of_hash(points[j], len(nodes)) == walk


def test_owners_and_primary_agree(ring100):
    for key in _keys(200, "agree"):
        owners = ring100.owners(TENANT, SUBTENANT, key, 3)
        assert ring100.primary(TENANT, SUBTENANT, key) == owners[0]
        assert owners == ring100.owners_of_hash(placement_hash(TENANT, SUBTENANT, key), 3)
        assert ring100.owners(TENANT, "other", key, 1) == ring100.owners_of_hash(placement_hash(TENANT, "other", key), 1)
    assert ring100.owners(TENANT, SUBTENANT, bytearray(b"k"), 2) == ring100.owners(TENANT, SUBTENANT, b"k", 2)
    assert len(ring100.owners(TENANT, SUBTENANT, b"k", 1000)) == 100


def test_namespaces_place_the_same_key_independently(ring100):
    key = b"shared-prefix-hash"
    hashes = {placement_hash(t, s, key) for t in ("a", "b", "ab") for s in ("a", "b", "ba")}
    assert len(hashes) == 9
    # Length prefixes: ("ab", "c") and ("a", "bc") are different namespaces.
    assert placement_hash("ab", "c", key) != placement_hash("a", "bc", key)


# -- the value type --------------------------------------------------------------------


def test_empty_ring():
    ring = Ring([])
    assert len(ring) == 0 and ring.nodes == () and ring.shares() == {}
    assert ring.owners(TENANT, SUBTENANT, b"k", 3) == [] and ring.owners_of_hash(5, 1) == []
    assert ring.primary(TENANT, SUBTENANT, b"k") is None
    assert ring == Ring({}) and "a" not in ring


def test_value_semantics():
    ring = Ring({"b": 1, "a": 2})
    assert ring.nodes == ("a", "b") and len(ring) == 2 and "a" in ring and "z" not in ring
    assert ring.weight("a") == 2.0 and ring.weights == {"a": 2.0, "b": 1.0} and ring.vnodes == DEFAULT_VNODES
    assert ring == Ring({"a": 2.0, "b": 1.0}) and hash(ring) == hash(Ring({"a": 2.0, "b": 1.0}))
    assert ring != Ring({"a": 2, "b": 1}, vnodes=10)
    assert ring != Ring({"a": 4, "b": 2})  # same placement, other weights: not equal
    assert ring != Ring(["a", "b"]) and ring != "ring"
    assert Ring(iter(["x", "y"])) == Ring({"x": 1, "y": 1})
    with pytest.raises(InvalidArgumentError, match="'z' is not in the ring"):
        ring.weight("z")
    assert "vnodes=2000" in repr(ring)


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ({"a": 0}, "weight of node 'a' must be a finite number > 0, got 0"),
        ({"a": -1.5}, "weight of node 'a' must be a finite number > 0, got -1.5"),
        ({"a": float("nan")}, "weight of node 'a'"),
        ({"a": float("inf")}, "weight of node 'a'"),
        ({"a": True}, "weight of node 'a'"),
        ({"a": "2"}, "weight of node 'a'"),
        ({"": 1}, "node ids must be non-empty strings, got ''"),
        ([""], "node ids must be non-empty strings, got ''"),
        ([3], "node ids must be non-empty strings, got 3"),
        (["a", "a"], "node id 'a' is listed twice"),
        ("abc", "not str"),
        (5, "not int"),
    ],
)
def test_bad_nodes_are_config_errors(nodes, message):
    with pytest.raises(ConfigError) as err:
        Ring(nodes)
    assert message in str(err.value)


@pytest.mark.parametrize("vnodes", [0, -1, 2.5, True, None])
def test_bad_vnodes(vnodes):
    with pytest.raises(ConfigError, match="vnodes must be an int >= 1"):
        Ring(["a"], vnodes=vnodes)


def test_bad_lookups_are_invalid_arguments(ring100):
    for count, message in [(0, "count must be at least 1, got 0"), (-2, "at least 1, got -2"), ("2", "count must be an int"), (1.0, "an int"), (True, "an int")]:
        with pytest.raises(InvalidArgumentError, match=message):
            ring100.owners(TENANT, SUBTENANT, b"k", count)
        with pytest.raises(InvalidArgumentError, match=message):
            Ring([]).owners_of_hash(0, count)
    for h, message in [(-1, r"in \[0, 2\*\*64\), got -1"), (HASH_SPACE, "got 18446744073709551616"), (1.5, "must be an int, got float")]:
        with pytest.raises(InvalidArgumentError, match=message):
            ring100.owners_of_hash(h, 1)
    with pytest.raises(InvalidArgumentError, match="tenant 'a/b' is invalid"):
        ring100.owners("a/b", SUBTENANT, b"k", 1)
    with pytest.raises(InvalidArgumentError, match="subtenant"):
        ring100.primary(TENANT, "", b"k")
    with pytest.raises(InvalidArgumentError, match="tenant"):
        placement_hash(["unhashable"], SUBTENANT, b"k")
    with pytest.raises(InvalidArgumentError, match="is a str"):
        ring100.owners(TENANT, SUBTENANT, "text", 1)


def test_cost_of_build_and_lookup(monkeypatch):
    """The work of building and of a lookup, counted rather than timed (a time
    bound depends on the machine): one hash per point to build, one per key to
    look up, and a walk of a few points for 3 owners, about a coupon-collector
    walk (N * H_N points) for all N."""
    hashes = 0

    def counting_xxh3(data: bytes) -> int:
        nonlocal hashes
        hashes += 1
        return xxhash.xxh3_64_intdigest(data)

    class CountingList(list):
        read = 0

        def __getitem__(self, index):
            items = super().__getitem__(index)
            CountingList.read += len(items) if isinstance(index, slice) else 1
            return items

    monkeypatch.setattr(ring_module, "_xxh3", counting_xxh3)
    ring = Ring(NODES_100)
    assert hashes == 100 * DEFAULT_VNODES
    ring._owner_ids = CountingList(ring._owner_ids)  # every point a lookup reads
    keys = _keys(1000, "speed")
    harmonic_100 = sum(1 / k for k in range(1, 101))
    for count, points_per_lookup in [(1, 1), (3, 4), (100, 2 * 100 * harmonic_100)]:
        hashes, CountingList.read = 0, 0
        for key in keys:
            owners = ring.owners(TENANT, SUBTENANT, key, count)
            assert len(set(owners)) == len(owners) == count
        assert hashes == len(keys), count
        assert CountingList.read <= points_per_lookup * len(keys), (count, CountingList.read)


def test_bench_ring_figures():
    from bench import ring as bench_ring

    figures = bench_ring.run(vnodes=50, keys=2000, movement_keys=300)
    assert [b["nodes"] for b in figures["balance"]] == list(bench_ring.BALANCE_SIZES)
    assert [m["nodes"] for m in figures["movement"]] == list(bench_ring.MOVEMENT_SIZES)
    for m in figures["movement"]:
        assert 0 < m["add_moved"] < 1 and 0 < m["remove_moved"] < 1
    assert "| 100 |" in bench_ring.render(figures)
