"""``Client``: the asyncio SDK, its public surface.

A call validates its keys and values here, then hands them down:

- ``writes`` (put, put_many, put_from, delete) and ``reads`` (get, get_many,
  get_into, exists, lookup_prefix, list) split big batches into bounded RPCs
  and run each through the replica engines (``replicas``), which resume on
  the next replica when a daemon fails;
- ``mapcache`` says where each key goes (the cluster map and its ring,
  ``router``) and sends one RPC to a node by id;
- ``nodes`` holds the connections (gRPC, or the local channel to a daemon on
  this host), the handshake and the zero-copy data plane;
- ``repair`` rewrites blocks to owners that had lost them; ``admin`` answers
  statistics and namespace policies.

Values move by the data plane through registered memory when the daemon and
the client both have it, inline otherwise, and every value returned is
verified against the checksum its writer computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Sequence

from kvstore import durability, errors
from kvstore.client.admin import Admin
from kvstore.client.config import ClientConfig, Deadline, RetryPolicy
from kvstore.client.mapcache import MapCache
from kvstore.client.nodes import Nodes
from kvstore.client.reads import Reads
from kvstore.client.regions import MemoryRegion
from kvstore.client.repair import Repair
from kvstore.client.writes import Writes
from kvstore.namespace import Namespace, validate_key
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.convert import namespace_to_proto


def _as_view(value, index: int) -> memoryview:
    if isinstance(value, str):
        raise errors.InvalidArgumentError(f"value {index} is a str; values are bytes-like", index=index)
    try:
        view = memoryview(value)
    except TypeError:
        raise errors.InvalidArgumentError(
            f"value {index} has type {type(value).__name__}, which is not bytes-like", index=index
        ) from None
    if not view.c_contiguous:
        raise errors.InvalidArgumentError(f"value {index} is not a contiguous buffer", index=index)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _same_length(keys, first, second, first_name: str, second_name: str) -> None:
    if not (len(keys) == len(first) == len(second)):
        raise errors.InvalidArgumentError(
            f"{len(keys)} keys, {len(first)} {first_name} and {len(second)} {second_name}: give one of each per key"
        )


def _keys(keys: Sequence[bytes]) -> list[bytes]:
    return [validate_key(k, i) for i, k in enumerate(keys)]


class Client:
    """Async client of a kvstore deployment, scoped to one namespace.

    ``endpoints`` is "host:port", "h1:p1,h2:p2" or a list of those: any daemons
    of the cluster, from which the client learns the whole map.

    Every data call takes optional ``deadline`` (a ``Deadline`` or seconds)
    and ``retry`` (a ``RetryPolicy``) overriding the client's defaults.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        *,
        tenant: str | None = None,
        subtenant: str | None = None,
        config: ClientConfig | None = None,
        **settings: Any,
    ) -> None:
        overrides = dict(settings, endpoints=endpoints, tenant=tenant, subtenant=subtenant)
        if config is None:
            config = ClientConfig.load(overrides)
        else:
            config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
        self.config = config
        self.namespace = namespace_to_proto(Namespace(config.tenant, config.subtenant))
        self._nodes = Nodes(config)
        self._maps = MapCache(config, self._nodes)
        self._writes = Writes(config, self.namespace, self._maps, self._nodes)
        self._repair = Repair(
            self._maps, self._writes, durability.Durability(config.default_durability), config.attempt_timeout
        )
        self._reads = Reads(config, self.namespace, self._maps, self._nodes, self._repair)
        self._admin = Admin(self.namespace, self._maps)

    @property
    def client_id(self) -> str:
        return self._nodes.client_id

    @property
    def zero_copy(self) -> bool:
        """Whether a daemon accepted this client's zero-copy data plane."""
        return self._nodes.zero_copy

    @property
    def repaired(self) -> int:
        """Replicas rewritten by read repair."""
        return self._repair.repaired

    @property
    def max_value_bytes(self) -> int:
        return self._nodes.max_value_bytes

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def connect(self) -> None:
        """Reach a daemon, learn its limits and the cluster map (done lazily by the first call otherwise)."""
        await self._maps.connect()

    async def close(self) -> None:
        self._nodes.closed = True
        await self._repair.close()
        await self._maps.close()
        await self._nodes.close()

    # -- memory ------------------------------------------------------------

    def register(self, buffer) -> MemoryRegion:
        """Register a writable buffer (bytearray, numpy array, mmap) once for put_from/get_into.

        Returns a reusable MemoryRegion; close it (or use ``with``) when done.
        Without the native module the region still works, through inline copies.
        """
        return self._nodes.register(buffer)

    def register_ptr(self, address: int, length: int) -> MemoryRegion:
        """Register a raw range, such as an inference engine's pinned pool; the caller keeps it alive."""
        return self._nodes.register_ptr(address, length)

    def allocate(self, nbytes: int) -> MemoryRegion:
        """``nbytes`` of memory owned by the SDK, for put_from/get_into: fill and read
        it through ``region.buffer``. A daemon on this host maps it and copies each
        block with one memcpy (no RMA, checksums computed as it copies); other
        daemons reach it by RMA like a registered buffer, and so does every
        daemon when ``ucx_tls`` leaves shared memory out. Close it (or use
        ``with``) when done."""
        return self._nodes.allocate(nbytes)

    # -- the cluster map ---------------------------------------------------

    def cluster_map(self) -> dict:
        """The map this client routes by: epoch, nodes, replication."""
        return self._maps.describe()

    async def refresh_map(self) -> dict:
        """Re-read the cluster map from a daemon now; returns it as cluster_map() does."""
        await self.connect()
        await self._maps.refresh()
        return self.cluster_map()

    # -- writes ------------------------------------------------------------

    async def put(self, key: bytes, value, durability: str | None = None, **options) -> None:
        """Store one block; returns once it reached ``durability`` ("memory", "disk", "sync")."""
        await self.put_many([(key, value)], durability=durability, **options)

    async def put_many(
        self,
        items: Iterable[tuple[bytes, Any]] | Mapping[bytes, Any],
        durability: str | None = None,
        *,
        deadline: Deadline | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> int:
        """Store many blocks on their replicas; returns how many were stored."""
        level = self._durability(durability)
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        await self.connect()
        limit = self.max_value_bytes
        keys, views = [], []
        for i, pair in enumerate(pairs):
            try:
                key, value = pair
            except (TypeError, ValueError):
                raise errors.InvalidArgumentError(f"item {i} is not a (key, value) pair", index=i) from None
            keys.append(validate_key(key, i))
            view = _as_view(value, i)
            self._check_size(view.nbytes, limit, i)
            views.append(view)
        return await self._writes.put_values(keys, views, level, self._maps.new_call(deadline, retry))

    async def put_from(
        self,
        keys: Sequence[bytes],
        region: MemoryRegion,
        offsets: Sequence[int],
        sizes: Sequence[int],
        durability: str | None = None,
        *,
        deadline: Deadline | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> int:
        """Store blocks that lie in a registered region; every replica reads them by RMA.

        Returns how many were stored. With no zero-copy path to a daemon the
        bytes travel inline instead, with the same result.
        """
        level = self._durability(durability)
        keys = _keys(keys)
        _same_length(keys, offsets, sizes, "offsets", "sizes")
        await self.connect()
        limit = self.max_value_bytes
        for i, (offset, size) in enumerate(zip(offsets, sizes)):
            region.check(offset, size, i)
            self._check_size(size, limit, i)
        return await self._writes.put_region(keys, region, offsets, sizes, level, self._maps.new_call(deadline, retry))

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Delete blocks from every node that holds them; returns how many existed.

        Raises UnavailableError when an owner of a key could not be reached
        (its copy would come back when it does)."""
        keys = _keys(keys)
        await self.connect()
        return await self._writes.delete(keys)

    def _durability(self, value: str | None) -> durability.Durability:
        return durability.parse(value or self.config.default_durability)

    @staticmethod
    def _check_size(size: int, limit: int, index: int) -> None:
        if size > limit:
            raise errors.InvalidArgumentError(
                f"value {index} is {size} bytes; the daemon's limit is {limit}", code=ErrorCode.VALUE_TOO_LARGE, index=index
            )

    # -- reads -------------------------------------------------------------

    async def get(self, key: bytes, **options) -> bytes | None:
        """The block's bytes, or None when it is not stored."""
        return (await self.get_many([key], **options))[0]

    async def get_many(
        self, keys: Sequence[bytes], *, deadline: Deadline | float | None = None, retry: RetryPolicy | None = None
    ) -> list[bytes | None]:
        """Blocks in the order of ``keys``; None for each miss."""
        keys = _keys(keys)
        await self.connect()
        return await self._reads.get_values(keys, self._maps.new_call(deadline, retry))

    async def get_into(
        self,
        keys: Sequence[bytes],
        region: MemoryRegion,
        offsets: Sequence[int],
        capacities: Sequence[int],
        *,
        deadline: Deadline | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> list[int | None]:
        """Fetch blocks straight into a registered region (a replica writes them by RMA).

        Returns the bytes written per key, None for a miss. A block larger than its
        capacity raises InvalidArgumentError (code BUFFER_TOO_SMALL) naming its index.
        """
        keys = _keys(keys)
        _same_length(keys, offsets, capacities, "offsets", "capacities")
        for i, (offset, capacity) in enumerate(zip(offsets, capacities)):
            region.check(offset, capacity, i)
        await self.connect()
        results = await self._reads.get_into(keys, region, offsets, capacities, self._maps.new_call(deadline, retry))
        for i, result in enumerate(results):
            if result is not None and result < 0:
                raise errors.InvalidArgumentError(
                    f"block {i} is {-result} bytes but its slot holds {capacities[i]}",
                    code=ErrorCode.BUFFER_TOO_SMALL,
                    index=i,
                )
        return results

    async def exists(
        self, keys: Sequence[bytes], *, deadline: Deadline | float | None = None, retry: RetryPolicy | None = None
    ) -> list[bool]:
        """For each key, whether a block is stored under it."""
        keys = _keys(keys)
        await self.connect()
        return await self._reads.exists(keys, self._maps.new_call(deadline, retry))

    async def lookup_prefix(
        self, keys: Sequence[bytes], *, deadline: Deadline | float | None = None, retry: RetryPolicy | None = None
    ) -> int:
        """How many leading keys, in order, are stored (the scheduler's prefix-cache hit)."""
        keys = _keys(keys)
        await self.connect()
        return await self._reads.lookup_prefix(keys, self._maps.new_call(deadline, retry))

    async def list(self, prefix: bytes = b"", *, limit: int | None = None) -> list[tuple[bytes, int]]:
        """(key, length) of stored blocks whose key starts with ``prefix``, in key order, across the cluster."""
        if not isinstance(prefix, bytes):
            raise errors.InvalidArgumentError("prefix must be bytes")
        await self.connect()
        return await self._reads.list(prefix, limit)

    # -- admin and statistics ----------------------------------------------

    async def stat(self) -> dict:
        """Blocks and bytes stored in this client's namespace, summed over the
        nodes that answered (each replica counts)."""
        return await self._admin.stat()

    async def server_stats(self) -> dict:
        """Daemon-wide statistics of one daemon: tiers, namespaces, uptime, cluster view."""
        return await self._admin.server_stats()

    async def cluster_stats(self) -> list[dict]:
        """server_stats() of every node of the map; a node that does not answer
        is listed with ``"up": False`` and the error."""
        return await self._admin.cluster_stats()

    async def set_replication(self, replicas: int, write_quorum: int = 0) -> dict:
        """Replicas and write quorum of this client's namespace on every node
        (replicas 0 returns it to the cluster default; write_quorum 0 = a majority)."""
        return await self._admin.set_replication(replicas, write_quorum)

    async def set_rate_limit(self, requests_per_second: float, burst: int = 0) -> dict:
        """Requests per second each daemon serves this client's namespace, in bursts
        of ``burst`` (default: one second's worth); beyond it calls fail with
        ResourceExhaustedError (RATE_LIMITED), which the retry policy retries. 0: unlimited."""
        return await self._admin.set_rate_limit(requests_per_second, burst)

    async def replication(self) -> dict:
        """Replicas and write quorum this client's namespace is written with."""
        return await self._admin.replication()

    async def namespaces(self, tenant: str = "") -> list[dict]:
        return await self._admin.namespaces(tenant)

    async def drop_namespace(self, tenant: str | None = None, subtenant: str | None = None) -> dict:
        """Delete every block of a namespace (default: this client's) at once, on every node;
        under --auth token the namespace itself is gone too."""
        return await self._admin.drop_namespace(self._namespace_named(tenant, subtenant))

    async def create_namespace(self, tenant: str | None = None, subtenant: str | None = None) -> bool:
        """Create a namespace (default: this client's); under --auth token data tokens
        work only on created ones. False when it existed."""
        return await self._admin.create_namespace(self._namespace_named(tenant, subtenant))

    async def create_token(
        self, tenant: str, subtenant: str = "", *, read_only: bool = False, description: str = ""
    ) -> dict:
        """A new data token for a tenant (every subtenant) or one subtenant: its
        ``id`` and, this once, the ``token`` itself."""
        return await self._admin.create_token(tenant, subtenant, read_only=read_only, description=description)

    async def tokens(self, tenant: str = "") -> list[dict]:
        """The data tokens (never their secrets)."""
        return await self._admin.tokens(tenant)

    async def revoke_token(self, token_id: str) -> None:
        """Revoke a data token on every daemon; its next call is UNAUTHENTICATED."""
        await self._admin.revoke_token(token_id)

    def _namespace_named(self, tenant: str | None, subtenant: str | None):
        if tenant is None and subtenant is None:
            return self.namespace
        return namespace_to_proto(Namespace(tenant or self.config.tenant, subtenant or self.config.subtenant))
