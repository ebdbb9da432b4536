"""The Data service: batched Put, Get, Exists, LookupPrefix, Delete, List, Stat.

Each handler validates its whole batch before touching storage, so a bad entry
rejects the request with the entry's index and nothing of it is stored.

A put that names a region (zero-copy) goes: rpc.handlers (parsing, error
mapping, metrics) -> here (validation, routing) -> ``DataPlane.transfer_for``
(the client's session and region resolved, shared memory or RMA chosen once:
one ``Transfer``) -> ``BlockStore.put_remote`` with that transfer and each
block's client address (storage.store: arena room reserved in storage.memory,
filled by the transfer, verified, appended to storage.disk, published). A get
with a region goes the same way to ``BlockStore.get_remote``.
"""

from __future__ import annotations

from kvstore._proto.v1 import data_pb2 as pb
from kvstore.durability import Durability
from kvstore.errors import InvalidArgumentError, WrongNodeError
from kvstore.namespace import Namespace, validate_key
from kvstore.protocol import metadata
from kvstore.protocol.codes import ErrorCode
from kvstore.protocol.convert import durability_from_proto, namespace_of, namespace_to_proto
from kvstore.server.admission import Admission
from kvstore.server.auth.guard import caller
from kvstore.server.cluster.state import ClusterState
from kvstore.server.config import ServerConfig
from kvstore.server.dataplane import DataPlane
from kvstore.server.metrics import Metrics
from kvstore.server.rpc.handlers import service
from kvstore.server.rpc.local import LocalContext
from kvstore.server.rpc.wire import encode_get_response
from kvstore.server.storage.store import BlockIn, BlockStore, verify_block

LIST_PAGE = 1000
MAX_BATCH_KEYS = 100_000


def peer_pid(context) -> int | None:
    """The client process on the other end of the call's connection, where the
    transport can tell (the local channel's peer credentials; never over TCP)."""
    return context.peer_pid if isinstance(context, LocalContext) else None


def routed_epoch(context) -> int | None:
    """The epoch of the cluster map the client routed the call with, if it said."""
    value = metadata.epoch_of(context.invocation_metadata())
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError(f"{metadata.EPOCH} metadata {value!r} is not an integer") from None


def storage_keys(ns: Namespace, keys) -> list[bytes]:
    if len(keys) > MAX_BATCH_KEYS:
        raise InvalidArgumentError(
            f"{len(keys)} keys in one request; the limit is {MAX_BATCH_KEYS}", code=ErrorCode.BATCH_TOO_LARGE
        )
    prefix = ns.prefix
    return [prefix + validate_key(key, i) for i, key in enumerate(keys)]


class DataService:
    def __init__(
        self,
        store: BlockStore,
        config: ServerConfig,
        metrics: Metrics,
        dataplane: DataPlane,
        cluster: ClusterState,
        admission: Admission,
    ) -> None:
        self.admission = admission
        self.store = store
        self.config = config
        self.metrics = metrics
        self.dataplane = dataplane
        self.cluster = cluster

    def handler(self):
        return service(
            "Data",
            {
                "Put": (pb.PutRequest, self.put),
                "Get": (pb.GetRequest, self.get),
                "Exists": (pb.KeysRequest, self.exists),
                "LookupPrefix": (pb.KeysRequest, self.lookup_prefix),
                "Delete": (pb.KeysRequest, self.delete),
                "List": (pb.ListRequest, self.list),
                "Stat": (pb.StatRequest, self.stat),
            },
            self.metrics,
            epoch=lambda: self.cluster.epoch,
        )

    async def put(self, request: pb.PutRequest, context) -> pb.PutResponse:
        ns = namespace_of(request)
        self._check_routing(ns, request.blocks, context)
        durability = durability_from_proto(request.durability, Durability(self.config.default_durability))
        if request.HasField("region"):
            blocks, addresses = self._remote_blocks(ns, request)
            transfer = await self.dataplane.transfer_for(
                request.session, request.region, put=True, peer_pid=peer_pid(context), owner=caller().key
            )
            stored = await self.store.put_remote(ns, blocks, durability, transfer, addresses)
        else:
            # Extracting and checksumming inline values copies them: off the loop.
            blocks = await self.store.offload(self._validated_blocks, ns, request)
            stored = await self.store.put(ns, blocks, durability)
        self.metrics.bytes_in.inc(sum(b.length for b in blocks))
        self.metrics.blocks_put.inc(stored)
        return pb.PutResponse(stored=stored)

    def _remote_blocks(self, ns: Namespace, request: pb.PutRequest) -> tuple[list[BlockIn], list[int]]:
        """Validated blocks of a zero-copy put, and where each one lies in the client's region."""
        self._check_batch(len(request.blocks))
        limit = self.config.max_value_size
        # The daemon computes them while copying (shared memory, or the client's process memory).
        unchecked = request.region.shared_memory.checksums_omitted or request.region.checksums_omitted
        blocks, addresses = [], []
        for i, block in enumerate(request.blocks):
            key = validate_key(block.key, i)
            if block.value:
                raise InvalidArgumentError(
                    f"block {i} carries an inline value in a request that names a region", index=i
                )
            if block.length > limit:
                raise InvalidArgumentError(
                    f"block {i} is {block.length} bytes; the limit is {limit}", code=ErrorCode.VALUE_TOO_LARGE, index=i
                )
            blocks.append(BlockIn(ns.prefix + key, None, block.length, None if unchecked else block.checksum))
            addresses.append(block.remote_address)
        return blocks, addresses

    def _check_routing(self, ns: Namespace, blocks, context) -> None:
        """Writes routed with another map must land on an owner (redis-cluster's MOVED).

        A client routing with our epoch is trusted: it may deliberately write to
        the next node of the ring when an owner is down (the rebalancer moves
        such blocks home later)."""
        cluster = self.cluster
        if len(cluster.members.members) <= 1 or routed_epoch(context) == cluster.epoch:
            return
        for i, block in enumerate(blocks):
            if not cluster.accepts(ns, block.key):
                owners = ", ".join(cluster.owners(ns, block.key))
                raise WrongNodeError(
                    f"block {i} belongs to {owners} under cluster map epoch {cluster.epoch}; refresh the map",
                    index=i,
                )

    @staticmethod
    def _check_batch(count: int) -> None:
        if count > MAX_BATCH_KEYS:
            raise InvalidArgumentError(
                f"{count} blocks in one request; the limit is {MAX_BATCH_KEYS}", code=ErrorCode.BATCH_TOO_LARGE
            )

    def _validated_blocks(self, ns: Namespace, request: pb.PutRequest) -> list[BlockIn]:
        self._check_batch(len(request.blocks))
        limit = self.config.max_value_size
        blocks = []
        for i, block in enumerate(request.blocks):
            key = validate_key(block.key, i)
            value = block.value  # upb copies on every access: read it once
            if len(value) > limit or block.length > limit:
                raise InvalidArgumentError(
                    f"block {i} is {max(len(value), block.length)} bytes; the limit is {limit}",
                    code=ErrorCode.VALUE_TOO_LARGE,
                    index=i,
                )
            verify_block(value, block.length, block.checksum, i)
            blocks.append(BlockIn(ns.prefix + key, value, block.length, block.checksum))
        return blocks

    async def get(self, request: pb.GetRequest, context) -> pb.GetResponse:
        ns = namespace_of(request)
        keys = storage_keys(ns, request.keys)
        response = pb.GetResponse()
        if not keys:
            return response
        if request.HasField("region"):
            return await self._get_remote(request, keys, peer_pid(context))
        if request.slots:
            raise InvalidArgumentError("slots given without the region they belong to", code=ErrorCode.INVALID_ARGUMENT)
        reservation = await self.admission.reserve(ns.tenant, context.peer())
        try:
            found = await self.store.get(keys, min(self.config.max_response_bytes, reservation.budget))
            nbytes = sum(len(block.value) for block in found if block is not None)
            reservation.settle(nbytes)
            hits = sum(1 for block in found if block is not None)
            self.metrics.gets.labels("hit").inc(hits)
            self.metrics.gets.labels("miss").inc(len(found) - hits)
            self.metrics.bytes_out.inc(nbytes)
            # Serialising the response copies every value: off the loop.
            response = await self.store.offload(encode_get_response, found)
        except BaseException:
            reservation.release()
            raise
        if hasattr(context, "add_done_callback"):
            context.add_done_callback(reservation.release)  # gRPC: held until the response has left
        else:
            reservation.release()  # the local channel: written to its socket's buffer as we return
        return response

    async def _get_remote(self, request: pb.GetRequest, keys: list[bytes], peer: int | None) -> pb.GetResponse:
        if len(request.slots) != len(keys):
            raise InvalidArgumentError(
                f"{len(keys)} keys but {len(request.slots)} slots; give one slot per key", code=ErrorCode.INVALID_ARGUMENT
            )
        transfer = await self.dataplane.transfer_for(
            request.session, request.region, put=False, peer_pid=peer, owner=caller().key
        )
        slots = request.slots
        found = await self.store.get_remote(
            keys, [slot.capacity for slot in slots], [slot.address for slot in slots], transfer
        )
        # Over shared memory or from the client's process memory the daemon verified
        # every checksum while it copied.
        response = pb.GetResponse(shared_memory=transfer.checksums_while_copying)
        hits = sent = 0
        for block in found:
            if block is None:
                response.results.add(found=False)
            else:
                length, checksum, written = block
                response.results.add(found=True, length=length, checksum=checksum, too_small=not written)
                hits += 1
                sent += length if written else 0
        self.metrics.gets.labels("hit").inc(hits)
        self.metrics.gets.labels("miss").inc(len(found) - hits)
        self.metrics.bytes_out.inc(sent)
        return response

    async def exists(self, request: pb.KeysRequest, context) -> pb.ExistsResponse:
        keys = storage_keys(namespace_of(request), request.keys)
        return pb.ExistsResponse(exists=await self.store.exists(keys))

    async def lookup_prefix(self, request: pb.KeysRequest, context) -> pb.LookupPrefixResponse:
        keys = storage_keys(namespace_of(request), request.keys)
        return pb.LookupPrefixResponse(count=await self.store.lookup_prefix(keys))

    async def delete(self, request: pb.KeysRequest, context) -> pb.DeleteResponse:
        keys = storage_keys(namespace_of(request), request.keys)
        existed = await self.store.exists(keys)
        deleted = await self.store.delete(keys)
        return pb.DeleteResponse(deleted=deleted, existed=existed)

    async def list(self, request: pb.ListRequest, context) -> pb.ListResponse:
        ns = namespace_of(request)
        if len(request.prefix) > 1024 or len(request.start_after) > 1024:
            raise InvalidArgumentError("prefix and start_after are at most 1024 bytes", code=ErrorCode.KEY_TOO_LARGE)
        limit = request.limit or LIST_PAGE
        if limit > 10 * LIST_PAGE:
            raise InvalidArgumentError(f"limit {limit} exceeds {10 * LIST_PAGE}", code=ErrorCode.BATCH_TOO_LARGE)
        entries, truncated = await self.store.list(ns, request.prefix, request.start_after, limit)
        return pb.ListResponse(
            entries=[pb.ListEntry(key=key, length=length) for key, length in entries], truncated=truncated
        )

    async def stat(self, request: pb.StatRequest, context) -> pb.StatResponse:
        ns = namespace_of(request)
        counters = self.store.namespace_counters(ns)
        return pb.StatResponse(
            stats=pb.NamespaceStats(
                namespace=namespace_to_proto(ns),
                blocks=counters.blocks,
                bytes=counters.bytes,
            )
        )

