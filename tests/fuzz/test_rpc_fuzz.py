"""Fuzz every RPC of kvstore.v1.Data, Cluster and Admin with hostile requests.

Against an in-process daemon (``rpc_daemon``: data plane off, a cluster of two
with a member that never answers), each RPC gets

* well-typed requests whose every field is hostile or valid (strategies.py):
  uint64 edges, names and keys at and past their limits, random rkeys,
  sessions and SharedMemory descriptors, slots that do not match the keys,
  unknown enum values, routing metadata that is wrong or not a number;
* the same requests serialized and then mutated (bit flips, cuts, injected
  fields of every wire type).

Every reply must be OK (a valid response, consistent with the request where
that can be told) or a precise status with its ErrorDetail (support.verdict);
after each test the daemon must still answer its health check and round-trip
a block byte for byte. DropNamespace is fuzzed only on namespaces the test
created just before.
"""

from __future__ import annotations

import uuid

import grpc
import pytest
from hypothesis import strategies as st

from kvstore._proto.v1 import admin_pb2, cluster_pb2, data_pb2
from kvstore.checksum import checksum
from kvstore.protocol.metadata import channel_options
from tests.fuzz.conftest import RPC_MAX_VALUE
from tests.fuzz.strategies import (
    ALL_TYPES,
    DROP,
    RPCS,
    World,
    message_of,
    mutate,
    mutated_requests,
    mutation_ops,
    requests,
    routing_metadata,
)
from tests.fuzz.support import (
    FORMS,
    S,
    assert_serving,
    call,
    describe,
    examples,
    run_cases,
    serving_epoch,
    verdict,
)

RPC_IDS = [f"{service}.{method}" for service, method in RPCS]
SEEDED_KEYS = [b"k0", b"k1", b"\x00", b"\xff" * 8, bytes(range(256)) * 4]  # the last is 1024 bytes


@pytest.fixture(scope="module")
def channel(rpc_daemon):
    with grpc.insecure_channel(rpc_daemon.address, options=channel_options()) as channel:
        yield channel


@pytest.fixture(scope="module")
def world(rpc_daemon, channel) -> World:
    """Namespaces holding a few blocks, so that gets, lists and deletes find something."""
    epoch = serving_epoch(channel)
    routed = (("kvstore-epoch", str(epoch)),)
    namespaces = [
        data_pb2.Namespace(tenant="fz", subtenant="a"),
        data_pb2.Namespace(tenant="fz", subtenant="b"),
        data_pb2.Namespace(tenant="t" * 128, subtenant="-"),
        data_pb2.Namespace(tenant="A-z.0:9", subtenant="_"),
    ]
    for ns in namespaces:
        blocks = [data_pb2.BlockWrite(key=k, value=k * 3, length=3 * len(k), checksum=checksum(k * 3)) for k in SEEDED_KEYS]
        request = data_pb2.PutRequest(namespace=ns, blocks=blocks)
        outcome = call(channel, "Data", "Put", request.SerializeToString(), routed)
        assert outcome.code == S.OK, outcome
    return World(max_value=RPC_MAX_VALUE, namespaces=namespaces, keys=SEEDED_KEYS, epochs=[epoch, epoch + 1, 0])


def inconsistency(method: str, request, body: bytes) -> str | None:
    """What is wrong with an OK reply to a well-typed request, if anything."""
    response = ALL_TYPES["Data", method][1].FromString(body)
    if method == "Put":
        if response.stored != len(request.blocks):
            return f"stored {response.stored} of {len(request.blocks)} blocks"
    elif method == "Get":
        if len(response.results) > len(request.keys):
            return f"{len(response.results)} results for {len(request.keys)} keys"
        for i, result in enumerate(response.results):
            if result.found and not request.HasField("region"):
                if result.length != len(result.value) or result.checksum != checksum(result.value):
                    return f"result {i}: length/checksum do not match its value"
    elif method == "Exists":
        if len(response.exists) != len(request.keys):
            return f"{len(response.exists)} answers for {len(request.keys)} keys"
    elif method == "LookupPrefix":
        if response.count > len(request.keys):
            return f"count {response.count} > {len(request.keys)} keys"
    elif method == "Delete":
        if len(response.existed) != len(request.keys) or response.deleted > len(request.keys):
            return f"deleted {response.deleted}, {len(response.existed)} existed flags for {len(request.keys)} keys"
    elif method == "List":
        listed = [e.key for e in response.entries]
        if len(listed) > (request.limit or 1000) or listed != sorted(listed):
            return f"{len(listed)} entries (limit {request.limit}), sorted: {listed == sorted(listed)}"
        if any(not k.startswith(request.prefix) or (request.start_after and k <= request.start_after) for k in listed):
            return "an entry outside prefix/start_after"
    return None


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rpc", RPC_IDS)
def test_typed_requests(rpc, form, rpc_daemon, channel, world):
    service, method = rpc.split(".")
    metadata = routing_metadata(world) if service == "Data" else st.just(())

    def check(case):
        request, meta = case
        payload = request.SerializeToString()
        outcome = call(channel, service, method, payload, meta)
        verdict(service, method, payload, outcome, meta)
        if outcome.code == S.OK and service == "Data":
            wrong = inconsistency(method, request, outcome.body)
            assert wrong is None, f"FINDING: OK but {wrong} for\n  {describe(service, method, payload, meta)}"

    run_cases(st.tuples(requests(service, method, world), metadata), check, examples("rpc-typed", form))
    assert_serving(rpc_daemon.address)
    reset_policies(channel, world)


def reset_policies(channel, world: World) -> None:
    """Back to the cluster default for the namespaces the other tests use (a fuzzed
    policy may have rate-limited one to a request a century)."""
    for ns in world.namespaces:
        request = admin_pb2.SetNamespacePolicyRequest(policy=cluster_pb2.NamespacePolicy(namespace=ns))
        assert call(channel, "Admin", "SetNamespacePolicy", request.SerializeToString()).code == S.OK


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rpc", RPC_IDS)
def test_mutated_requests(rpc, form, rpc_daemon, channel, world):
    service, method = rpc.split(".")

    def check(payload):
        verdict(service, method, payload, call(channel, service, method, payload))

    run_cases(mutated_requests(service, method, world), check, examples("rpc-mutated", form))
    assert_serving(rpc_daemon.address)
    reset_policies(channel, world)


@pytest.mark.parametrize("form", FORMS)
def test_drop_namespace_of_its_own(form, rpc_daemon, channel, world):
    """DropNamespace, typed and mutated, each time on a namespace created for it."""
    epoch = (("kvstore-epoch", str(world.epochs[0])),)
    drop_fields = message_of(admin_pb2.DropNamespaceRequest, world)  # hostile names, absent namespace...

    def check(case):
        kind, hostile, ops = case
        ns = data_pb2.Namespace(tenant="fzdrop-" + uuid.uuid4().hex[:10], subtenant="s")
        blocks = [data_pb2.BlockWrite(key=b"d%d" % i, value=b"x" * i, length=i, checksum=checksum(b"x" * i)) for i in range(3)]
        put = data_pb2.PutRequest(namespace=ns, blocks=blocks)
        assert call(channel, "Data", "Put", put.SerializeToString(), epoch).code == S.OK
        if kind == "own":
            request = admin_pb2.DropNamespaceRequest(namespace=ns)
        else:  # a hostile request: nothing valid in it but, by chance, a name of this test's daemon
            request = hostile
        payload = request.SerializeToString()
        if ops is not None:
            payload = mutate(payload, ops)
        outcome = call(channel, *DROP, payload)
        verdict(*DROP, payload, outcome)
        if kind == "own" and ops is None:
            assert outcome.code == S.OK
            dropped = admin_pb2.DropNamespaceResponse.FromString(outcome.body)
            assert (dropped.blocks, dropped.bytes) == (3, 3), dropped

    strategy = st.tuples(
        st.sampled_from(["own", "hostile"]),
        drop_fields.filter(lambda r: not _names_seeded(r, world)),
        st.one_of(st.none(), mutation_ops()),
    )
    run_cases(strategy, check, examples("drop-namespace", form))
    assert_serving(rpc_daemon.address)


def _names_seeded(request: admin_pb2.DropNamespaceRequest, world: World) -> bool:
    """Whether a hostile drop would name a namespace the other tests rely on."""
    return any(request.namespace == ns for ns in world.namespaces)
