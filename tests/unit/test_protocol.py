"""The protocol package both sides import: error codes pinned to errors.proto,
the status table round-tripping every error class and every code, the
local-channel framing, the protobuf conversions, and the import boundaries
between the core, the daemon and the SDK."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grpc
import pytest

from kvstore import errors
from kvstore._proto.v1 import data_pb2, errors_pb2
from kvstore.durability import NAMES, Durability
from kvstore.namespace import Namespace
from kvstore.protocol import convert, local_channel, status
from kvstore.protocol.codes import BY_NUMBER, ErrorCode
from kvstore.replication import Replication

ROOT = Path(__file__).resolve().parents[2]


def test_error_codes_are_the_protos_name_for_name_and_number_for_number():
    proto = dict(errors_pb2.ErrorCode.items())
    assert {code.value: code.number for code in ErrorCode} == proto
    assert BY_NUMBER[errors_pb2.WRONG_NODE] is ErrorCode.WRONG_NODE
    # The source of truth is the .proto file itself, not only the generated module.
    text = (ROOT / "protos/kvstore/v1/errors.proto").read_text()
    body = text.split("enum ErrorCode {")[1].split("}")[0]
    assert dict((n, int(v)) for n, v in re.findall(r"^\s*([A-Z_]+)\s*=\s*(\d+);", body, re.M)) == proto


def test_no_raise_site_names_a_code_as_a_bare_string():
    """Codes are written as ErrorCode members, so a code the contract lacks cannot be raised."""
    offenders = []
    for folder in ("kvstore", "server", "client"):
        for path in (ROOT / folder).rglob("*.py"):
            if "_proto" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.keyword) and node.arg == "code" and isinstance(node.value, ast.Constant):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
    assert offenders == []


def _wire_classes():
    return [cls for cls, _, _ in status.TABLE]


def _nearest_wire_class(cls):
    for wire_class in _wire_classes():
        if issubclass(cls, wire_class):
            return wire_class
    return errors.InternalError


BASES = ("KVStoreError", "RetryableError")  # never raised themselves


@pytest.mark.parametrize("name", [n for n in errors.__all__ if n not in BASES])
def test_every_error_class_round_trips_through_status_and_detail(name):
    cls = getattr(errors, name)
    sent = cls("block 3 is wrong", index=3)
    code, details, detail = status.wire_of(sent)
    received = status.error_from_status(code, details, detail, "node-1:7600")
    assert type(received) is _nearest_wire_class(cls)
    assert (received.code, received.index) == (sent.code, 3)
    assert received.message == f"block 3 is wrong [{code.name} from node-1:7600]"
    assert received.retryable == sent.retryable
    assert status.status_of(received) == code


def _rows_and_codes():
    """Every (row, code) the table gives that row: a row with a code takes only
    it; a row without takes every code no other row of its status claims, nor
    another row of its class (PermissionDeniedError leaves as UNAUTHENTICATED
    with that code only)."""
    for wire_class, grpc_status, row_code in status.TABLE:
        claimed = {
            c
            for cls, s, c in status.TABLE
            if c is not None and ((s == grpc_status) != (cls is wire_class))
        }
        for code in ErrorCode:
            if (row_code is None or code == row_code) and code not in claimed:
                yield pytest.param(wire_class, grpc_status, code, id=f"{wire_class.__name__}-{code.name}")


@pytest.mark.parametrize("wire_class, grpc_status, code", list(_rows_and_codes()))
def test_every_code_under_every_status_round_trips(wire_class, grpc_status, code):
    received = status.error_from_status(grpc_status, "x", status.detail_of(wire_class("x", code=code, index=7)))
    assert type(received) is wire_class and received.code == code and received.index == 7
    assert status.wire_of(received)[0] == grpc_status
    assert errors_pb2.ErrorDetail.FromString(status.detail_of(received)).code == code.number


def test_the_bases_of_the_tree_leave_as_internal_errors():
    for name in BASES:
        assert status.status_of(getattr(errors, name)("x")) == grpc.StatusCode.INTERNAL


def test_a_status_without_detail_gets_its_class_default_code():
    assert status.error_from_status(grpc.StatusCode.UNAVAILABLE, None).code == ErrorCode.ERROR_CODE_UNSPECIFIED
    assert status.error_from_status(grpc.StatusCode.FAILED_PRECONDITION, "moved").code == ErrorCode.WRONG_NODE
    lost = errors_pb2.ErrorDetail(code=ErrorCode.UNKNOWN_CLIENT.number, message="no session").SerializeToString()
    assert type(status.error_from_status(grpc.StatusCode.FAILED_PRECONDITION, "x", lost)) is errors.SessionLostError
    assert type(status.error_from_status(grpc.StatusCode.UNKNOWN, "?")) is errors.InternalError
    # A code from a newer daemon that this side does not know yet.
    detail = errors_pb2.ErrorDetail(code=999, message="new", index=-1).SerializeToString()
    assert status.error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "new", detail).code == ErrorCode.ERROR_CODE_UNSPECIFIED


def test_local_channel_frames_parse_back():
    head = local_channel.request_header(5, 42, 1.5, b"Get", 10)
    length, request_id, epoch, timeout, name_length = local_channel.REQUEST.unpack_from(head)
    assert (request_id, epoch, timeout, head[local_channel.REQUEST.size :]) == (5, 42, 1.5, b"Get")
    assert local_channel.payload_length(length, name_length) == 10
    assert len(head) + 10 == 4 + length
    cancel = local_channel.cancel_frame(9)
    length, request_id, _, _, name_length = local_channel.REQUEST.unpack_from(cancel)
    assert (request_id, name_length, local_channel.payload_length(length, name_length)) == (9, 0, 0)
    response = local_channel.response_header(3, 0, 7, 100)
    assert local_channel.RESPONSE.unpack(response) == (local_channel.RESPONSE.size - 4 + 100, 3, 0, 7)


def test_conversions_both_ways():
    assert NAMES == ("memory", "disk", "sync")
    for level in Durability:
        assert convert.durability_from_proto(convert.durability_to_proto(level), Durability.DISK) is level
    assert convert.durability_from_proto(data_pb2.DURABILITY_UNSPECIFIED, Durability.SYNC) is Durability.SYNC
    with pytest.raises(errors.InvalidArgumentError) as info:
        convert.durability_from_proto(9, Durability.DISK)
    assert info.value.code == ErrorCode.UNKNOWN_DURABILITY
    ns = Namespace("acme", "chat")
    assert convert.namespace_of(data_pb2.KeysRequest(namespace=convert.namespace_to_proto(ns))) == ns
    with pytest.raises(errors.InvalidArgumentError) as info:
        convert.namespace_of(data_pb2.KeysRequest())
    assert info.value.code == ErrorCode.INVALID_NAMESPACE
    policy = convert.policy_to_proto(ns, Replication(3, 2))
    assert convert.replication_of(policy.replicas, policy.write_quorum) == Replication(3, 2)
    assert convert.replication_of(0, 0) == Replication(1, 1)
    assert Replication(3, 2).within(2) == Replication(2, 2) and Replication.of(3) == Replication(3, 2)


def _imports(folder: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        if "_proto" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add((str(path.relative_to(ROOT)), node.module))
            elif isinstance(node, ast.Import):
                found.update((str(path.relative_to(ROOT)), alias.name) for alias in node.names)
    return found


@pytest.mark.parametrize(
    "folder, forbidden",
    [("server", ("kvstore.client",)), ("client", ("kvstore.server",)), ("kvstore", ("kvstore.client", "kvstore.server"))],
)
def test_import_boundaries(folder, forbidden):
    crossing = sorted(f"{path} imports {module}" for path, module in _imports(folder) if module.startswith(forbidden))
    assert crossing == []
