"""The checked-in generated code matches protos/, and the error tree maps one to one."""

import importlib.util
from pathlib import Path

import grpc
import pytest

from kvstore import errors
from kvstore._proto.v1 import errors_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current():
    try:
        spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
        generate = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generate)
        installed = generate.generator_version()
    except ImportError:
        pytest.skip("no grpcio-tools here (the newest-dependency run): the main test run checks the stubs")
    if installed != generate.GENERATOR:
        pytest.skip(f"grpcio-tools {installed} is not the generator ({generate.GENERATOR}): the main test run checks")
    assert generate.stale_files() == [], "run: python protos/generate.py"


def test_every_error_code_in_the_tree_exists_on_the_wire():
    names = set(errors_pb2.ErrorCode.keys())
    for cls in (
        errors.KVStoreError, errors.UnavailableError, errors.ResourceExhaustedError,
        errors.InvalidArgumentError, errors.PermissionDeniedError, errors.DataCorruptionError,
    ):
        assert cls.default_code in names


def test_retryable_split():
    assert errors.UnavailableError("x").retryable
    assert errors.DeadlineExceededError("x").retryable
    assert errors.ResourceExhaustedError("x").retryable
    for cls in (errors.InvalidArgumentError, errors.PermissionDeniedError, errors.DataCorruptionError, errors.InternalError):
        assert not cls("x").retryable
        assert issubclass(cls, errors.KVStoreError)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, metadata=()):
        self._code, self._details, self._metadata = code, details, metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._metadata


@pytest.mark.parametrize(
    "status, cls",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
        (grpc.StatusCode.UNAUTHENTICATED, errors.PermissionDeniedError),
        (grpc.StatusCode.DATA_LOSS, errors.DataCorruptionError),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
        (grpc.StatusCode.UNKNOWN, errors.InternalError),
    ],
)
def test_translate_statuses(status, cls):
    from kvstore.protocol.status import error_from_rpc as translate

    err = translate(_FakeRpcError(status, "boom"), "h:1")
    assert type(err) is cls and "boom" in err.message and "h:1" in err.message


def test_translate_reads_the_error_detail():
    from kvstore.protocol.metadata import ERROR_DETAIL as ERROR_DETAIL_KEY
    from kvstore.protocol.status import error_from_rpc as translate
    from kvstore.protocol.status import trailing_metadata

    sent = errors.InvalidArgumentError("key 3 is empty", code="EMPTY_KEY", index=3)
    err = translate(_FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "key 3 is empty", trailing_metadata(sent)), "h:1")
    assert (type(err), err.code, err.index) == (errors.InvalidArgumentError, "EMPTY_KEY", 3)
    assert trailing_metadata(sent)[0][0] == ERROR_DETAIL_KEY


def test_public_surface():
    import kvstore.client as client

    assert {"Client", "SyncClient", "ClientConfig", "RetryPolicy", "KVStoreError"} <= set(client.__all__)
    assert set(errors.__all__) == {n for n in dir(errors) if n.endswith("Error")}
