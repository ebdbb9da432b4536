"""The placement ring: which daemons own a key.

Consistent hashing with virtual nodes. A key's place on the ring is
``placement_hash(tenant, subtenant, key)``: xxh3-64 over the namespace's
storage key (length-prefixed names, then the key bytes), so equal keys of two
namespaces land independently. Each node owns ``vnode_count`` points on the
ring at ``xxh3_64(f"{node_id}#{i}".encode())`` for ``i`` in ``0..count-1``, and
``count`` is proportional to its weight (``round(vnodes * weight /
mean_weight)``, at least 1). The owners of a hash ``h`` are the distinct nodes
met walking clockwise from the first point at or after ``h`` (wrapping past
2**64 - 1 to 0); the first is the primary.

Everything here is a pure function of the node ids, their weights and
``vnodes``: no Python ``hash()``, no randomness, so every process on every
machine computes the same owners. Adding or removing one node of N equal
nodes moves only the keys whose owner set gains or loses that node, about 1/N
of them. (With unequal weights the mean weight changes too, so the other
nodes' point counts shift a little and a few more keys move between them.)

numpy, when importable, only speeds up building a ring (one sort of N x vnodes
points); lookups are ``bisect`` on an ``array('Q')`` and need only xxhash.
"""

from __future__ import annotations

import math
import numbers
import operator
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from functools import lru_cache

import xxhash

from kvstore.errors import ConfigError, InvalidArgumentError
from kvstore.namespace import Namespace, validate_key

# 2000 points per unit weight: the primary share of the most loaded of 100 equal
# nodes is ~1.06x the mean (relative spread of one node's share ~ 1/sqrt(2000)
# = 2.2%), and building a 100-node ring (200k points) takes ~0.06 s with numpy
# and ~0.2 s without.
DEFAULT_VNODES = 2000
HASH_SPACE = 1 << 64

_xxh3 = xxhash.xxh3_64_intdigest
_SHORT_WALK = 6  # up to this many owners, walk point by point

try:  # optional: a faster sort when building
    import numpy as _np
except ImportError:  # pragma: no cover - exercised by forcing _np = None in the tests
    _np = None


def _harmonic(k: int) -> float:
    """H_k = 1 + 1/2 + ... + 1/k (0 for k = 0), closely enough to size a walk."""
    if k < 8:
        return sum(1 / j for j in range(1, k + 1))
    return math.log(k) + 0.5772156649 + 1 / (2 * k) - 1 / (12 * k * k)


@lru_cache(maxsize=4096)
def _namespace_prefix(tenant: str, subtenant: str) -> bytes:
    return Namespace(tenant, subtenant).prefix


def placement_hash(tenant: str, subtenant: str, key: bytes) -> int:
    """xxh3-64 over ``Namespace(tenant, subtenant).storage_key(key)``: where the key sits on the ring."""
    if type(key) is not bytes:
        key = validate_key(key)
    try:
        prefix = _namespace_prefix(tenant, subtenant)
    except TypeError:  # unhashable names: let Namespace say what is wrong
        prefix = Namespace(tenant, subtenant).prefix
    return _xxh3(prefix + key)


def vnode_position(node_id: str, index: int) -> int:
    """Where the ``index``-th virtual node of ``node_id`` sits on the ring."""
    return _xxh3(f"{node_id}#{index}".encode())


def _parse_nodes(nodes) -> dict[str, float]:
    if isinstance(nodes, Mapping):
        items = list(nodes.items())
    elif isinstance(nodes, Iterable) and not isinstance(nodes, (str, bytes)):
        items = []
        seen = set()
        for node_id in nodes:
            if isinstance(node_id, str):
                if node_id in seen:
                    raise ConfigError(f"ring node id {node_id!r} is listed twice")
                seen.add(node_id)
            items.append((node_id, 1.0))
    else:
        raise ConfigError(
            f"ring nodes must be a mapping of node id to weight or an iterable of node ids, not {type(nodes).__name__}"
        )
    weights: dict[str, float] = {}
    for node_id, weight in items:
        if not isinstance(node_id, str) or not node_id:
            raise ConfigError(f"ring node ids must be non-empty strings, got {node_id!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"ring weight of node {node_id!r} must be a finite number > 0, got {weight!r}")
        weights[node_id] = float(weight)
    return weights


def _check_count(count) -> int:
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise InvalidArgumentError(f"count must be an int >= 1, got {count!r}")
    if count < 1:
        raise InvalidArgumentError(f"count must be at least 1, got {count}")
    return int(count)


class Ring:
    """An immutable consistent-hash ring over weighted nodes.

    ``nodes`` maps node id to weight (relative capacity, > 0); an iterable of
    ids gives each weight 1.0. A node gets ``max(1, round(vnodes * weight /
    mean_weight))`` points (round half to even, ``mean_weight`` the correctly
    rounded sum of the weights over their number). An empty ring owns nothing.
    Two rings are equal when their nodes, weights and ``vnodes`` are.
    """

    __slots__ = ("_weights", "_vnodes", "_nodes", "_counts", "_positions", "_owner_index", "_owner_ids")

    def __init__(self, nodes: Mapping[str, float] | Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        if isinstance(vnodes, bool) or not isinstance(vnodes, numbers.Integral) or vnodes < 1:
            raise ConfigError(f"ring vnodes must be an int >= 1, got {vnodes!r}")
        self._vnodes = int(vnodes)
        self._weights = _parse_nodes(nodes)
        self._nodes = tuple(sorted(self._weights))
        if len(self._nodes) > 0xFFFF:  # the per-point node index is 16 bits
            raise ConfigError(f"ring holds at most 65535 nodes, got {len(self._nodes)}")
        if self._nodes:
            # fsum: correctly rounded, so the counts do not depend on the order the weights came in.
            mean = math.fsum(self._weights.values()) / len(self._nodes)
            self._counts = tuple(max(1, round(self._vnodes * self._weights[n] / mean)) for n in self._nodes)
        else:
            self._counts = ()
        self._positions, self._owner_index = _build(self._nodes, self._counts)
        # Per point, the owning node's id (shared str objects): one index fewer per lookup step.
        self._owner_ids = [self._nodes[i] for i in self._owner_index]

    # -- what the ring holds ------------------------------------------------

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, sorted."""
        return self._nodes

    @property
    def vnodes(self) -> int:
        """Virtual nodes per unit (mean) weight."""
        return self._vnodes

    @property
    def weights(self) -> dict[str, float]:
        """A copy of node id -> weight."""
        return dict(self._weights)

    def weight(self, node_id: str) -> float:
        try:
            return self._weights[node_id]
        except KeyError:
            raise InvalidArgumentError(f"node {node_id!r} is not in the ring") from None

    def vnode_count(self, node_id: str) -> int:
        """How many points ``node_id`` has on the ring."""
        self.weight(node_id)
        return self._counts[self._nodes.index(node_id)]

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._weights

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._vnodes == other._vnodes and self._weights == other._weights

    def __hash__(self) -> int:
        return hash((self._vnodes, tuple(sorted(self._weights.items()))))

    def __repr__(self) -> str:
        shown = ", ".join(f"{n!r}: {self._weights[n]:g}" for n in self._nodes[:4])
        more = f", ... ({len(self._nodes)} nodes)" if len(self._nodes) > 4 else ""
        return f"Ring({{{shown}{more}}}, vnodes={self._vnodes})"

    # -- lookups ------------------------------------------------------------

    def owners_of_hash(self, h: int, count: int) -> list[str]:
        """The ``count`` distinct nodes clockwise from ring position ``h`` (fewer if the ring has fewer)."""
        if type(count) is not int or count < 1:
            count = _check_count(count)
        if type(h) is not int:
            try:
                h = operator.index(h)
            except TypeError:
                raise InvalidArgumentError(f"ring position must be an int, got {type(h).__name__}") from None
        if not 0 <= h < HASH_SPACE:
            raise InvalidArgumentError(f"ring position must be in [0, 2**64), got {h}")
        owner_ids = self._owner_ids
        total = len(owner_ids)
        if not total:
            return []
        i = bisect_left(self._positions, h)
        if i == total:
            i = 0
        first = owner_ids[i]
        nodes = len(self._nodes)
        want = count if count < nodes else nodes
        if want == 1:
            return [first]
        if want <= _SHORT_WALK:
            found = [first]
            while True:
                i += 1
                if i == total:
                    i = 0
                node = owner_ids[i]
                if node not in found:  # a few ids: a list beats a set
                    found.append(node)
                    if len(found) == want:
                        return found
        # Many owners (up to every node, in ring order): take runs of points and keep the first
        # occurrence of each node with dict.fromkeys, which walks in C. The first run is the
        # expected walk to meet `want` of `nodes` equally likely nodes, with a margin; a run
        # that falls short is doubled, and a run of every point meets every node.
        run = min(total, int(1.5 * nodes * (_harmonic(nodes) - _harmonic(nodes - want))) + 16)
        while True:
            end = i + run
            if end <= total:
                seen = dict.fromkeys(owner_ids[i:end])
            else:
                seen = dict.fromkeys(owner_ids[i:])
                seen.update(dict.fromkeys(owner_ids[: end - total]))
            if len(seen) >= want:
                return list(seen)[:want]
            run = min(total, 2 * run)

    def owners(self, tenant: str, subtenant: str, key: bytes, count: int) -> list[str]:
        """The ``count`` distinct nodes that own ``key`` of namespace (tenant, subtenant), primary first."""
        return self.owners_of_hash(placement_hash(tenant, subtenant, key), count)

    def primary(self, tenant: str, subtenant: str, key: bytes) -> str | None:
        """The first owner of the key, or None on an empty ring."""
        owner_ids = self._owner_ids
        if not owner_ids:
            return None
        i = bisect_left(self._positions, placement_hash(tenant, subtenant, key))
        return owner_ids[i if i < len(owner_ids) else 0]

    # -- figures ------------------------------------------------------------

    def shares(self) -> dict[str, float]:
        """Exact fraction of the hash space each node owns as primary, from the arcs between points.

        A point owns the arc from the previous point (exclusive) to itself (inclusive).
        """
        positions, owner_index = self._positions, self._owner_index
        sums = [0] * len(self._nodes)
        if positions:
            previous = positions[-1] - HASH_SPACE  # the arc of the first point wraps past 0
            for position, node in zip(positions, owner_index):
                sums[node] += position - previous
                previous = position
        return {node: total / HASH_SPACE for node, total in zip(self._nodes, sums)}


def _build(nodes: tuple[str, ...], counts: tuple[int, ...]) -> tuple[array, array]:
    """The sorted points of the ring and, per point, the index of its node.

    Points are ordered by (position, node index); two nodes at one position (a
    2**-64 event) keep both points, the first owning the position.
    """
    positions = array("Q")
    owner_index = array("H")
    total = sum(counts)
    if not total:
        return positions, owner_index
    raw = [_xxh3(f"{node}#{i}".encode()) for node, count in zip(nodes, counts) for i in range(count)]
    if _np is not None:
        points = _np.array(raw, dtype=_np.uint64)
        owners = _np.repeat(_np.arange(len(nodes), dtype=_np.uint16), counts)
        order = _np.argsort(points, kind="stable")  # stable: ties stay in node order
        positions.frombytes(points[order].tobytes())
        owner_index.frombytes(owners[order].tobytes())
        return positions, owner_index
    # Pure Python: the node index rides in the low bits so one sort of ints orders by (position, node).
    shift = 16
    keyed = []
    start = 0
    for index, count in enumerate(counts):
        keyed += [p << shift | index for p in raw[start : start + count]]
        start += count
    keyed.sort()
    mask = (1 << shift) - 1
    positions.extend([k >> shift for k in keyed])
    owner_index.extend([k & mask for k in keyed])
    return positions, owner_index


__all__ = ["DEFAULT_VNODES", "HASH_SPACE", "Ring", "placement_hash", "vnode_position"]
