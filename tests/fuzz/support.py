"""What the fuzz tests share: how many cases each runs, how a case is sent, and
what every reply must be.

Counts. Each test runs in two forms: ``short`` (CI: a few hundred cases in
all, well under a minute) and ``long`` (``@pytest.mark.slow``, with
``--runslow``: over 10 000 cases in all). ``EXAMPLES`` holds both counts per
test; ``KVSTORE_FUZZ_SCALE`` multiplies them (e.g. 10 for a soak of the short
form). Runs are derandomized (the same cases every run, so CI is not flaky);
``KVSTORE_FUZZ_SEED=<int>`` explores other cases with that seed instead.

Verdicts. A reply is OK or a precise status: one of ``PRECISE``, carrying the
daemon's ``kvstore-error-bin`` ErrorDetail. UNKNOWN, INTERNAL, a deadline (a
hang), DATA_LOSS, a missing ErrorDetail or an OK reply that is not a valid
response message is a finding: the assertion says ``FINDING`` and shows the
request, and hypothesis shrinks it to a minimal one first.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from kvstore._proto.v1 import cluster_pb2, data_pb2, errors_pb2
from kvstore.checksum import checksum
from kvstore.harness.health import grpc_serving
from kvstore.protocol import local_channel
from kvstore.protocol.metadata import ERROR_DETAIL, channel_options
from tests.fuzz.strategies import ALL_TYPES, path

# -- how many cases ------------------------------------------------------------------

FORMS = [pytest.param("short", id="short"), pytest.param("long", id="long", marks=pytest.mark.slow)]

# Test name -> (short, long) example counts; the comment is the total it contributes.
# (The two RPCs with empty requests, GetClusterMap and ServerStats, have one typed
# case each: hypothesis stops there. Their mutated forms are not empty.)
EXAMPLES: dict[str, tuple[int, int]] = {
    "rpc-typed": (12, 450),  # x 13 RPCs (11 with fields): 134 / 4952
    "rpc-mutated": (6, 200),  # x 13 RPCs: 78 / 2600
    "drop-namespace": (8, 150),
    "hello": (10, 250),
    "zero-copy-put": (12, 700),
    "zero-copy-get": (12, 600),
    "grpc-tcp": (12, 300),
    "local-preamble": (10, 200),
    "local-frames": (20, 1000),
}  # in all: 296 short, 10 752 long (plus the fixed cases of the finding tests)
SCALE = float(os.environ.get("KVSTORE_FUZZ_SCALE", "1"))
SEED = os.environ.get("KVSTORE_FUZZ_SEED")


def examples(name: str, form: str) -> int:
    short, long = EXAMPLES[name]
    return max(1, round((short if form == "short" else long) * SCALE))


def run_cases(strategy: st.SearchStrategy, check: Callable, count: int) -> None:
    """``check(case)`` for ``count`` cases drawn from ``strategy`` (shrunk on failure).
    Prints how the replies were distributed (see them with ``pytest -s``)."""
    TALLY.clear()
    started, ran = time.monotonic(), [0]

    # Built per call so that the fixtures' live values can shape the strategy.
    @settings(
        max_examples=count,
        deadline=None,
        derandomize=SEED is None,
        database=None,  # no .hypothesis/ directory, no replay of old failures: the same cases every run
        suppress_health_check=list(HealthCheck),  # large inputs and slow cases are the point
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        report_multiple_bugs=False,
        print_blob=False,
    )
    @given(strategy)
    def case(value):
        ran[0] += 1
        check(value)

    if SEED is not None:
        case = seed(int(SEED))(case)
    case()
    shown = ", ".join(f"{k} {n}" for k, n in TALLY.most_common())
    # Fewer than asked when a strategy has fewer distinct values (an empty request type).
    print(f"\n{ran[0]} cases (of {count} asked) in {time.monotonic() - started:.1f}s: {shown}")


# Replies seen in the current run_cases, as "STATUS/ERROR_CODE".
TALLY: collections.Counter = collections.Counter()


def tally(outcome: "Outcome") -> None:
    code = ""
    if outcome.detail is not None and outcome.detail.code in errors_pb2.ErrorCode.values():
        code = errors_pb2.ErrorCode.Name(outcome.detail.code)
    TALLY[outcome.code.name + ("/" + code if code else "")] += 1


# -- what a reply must be ---------------------------------------------------------------

S = grpc.StatusCode
# Statuses that say precisely what was wrong with the request (or that the
# daemon cannot take it now): the only ones bad input may get.
PRECISE = frozenset(
    {
        S.OK,
        S.INVALID_ARGUMENT,
        S.FAILED_PRECONDITION,
        S.UNAVAILABLE,
        S.RESOURCE_EXHAUSTED,
        S.UNIMPLEMENTED,
        S.OUT_OF_RANGE,
        S.NOT_FOUND,
        S.ALREADY_EXISTS,
        S.PERMISSION_DENIED,
        S.UNAUTHENTICATED,
    }
)
PRECISE_NUMBERS = frozenset(code.value[0] for code in PRECISE)
CALL_TIMEOUT = 30.0  # past this a call counts as a hang
MAX_SHOWN = 2000  # bytes of a request shown in a finding


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    detail: errors_pb2.ErrorDetail | None  # the kvstore-error-bin entry, parsed
    body: bytes | None  # the serialized response when OK
    seconds: float


def call(channel: grpc.Channel, service: str, method: str, payload: bytes, metadata=(), timeout=CALL_TIMEOUT) -> Outcome:
    """Send raw bytes to one method; the reply as an Outcome (never raises for a status)."""
    stub = channel.unary_unary(path(service, method), request_serializer=None, response_deserializer=None)
    started = time.monotonic()
    try:
        body, rpc = stub.with_call(payload, timeout=timeout, metadata=metadata or None)
        return Outcome(S.OK, "", None, body, time.monotonic() - started)
    except grpc.RpcError as exc:
        entries = [v for k, v in (exc.trailing_metadata() or ()) if k == ERROR_DETAIL]
        detail = None
        if entries:
            detail = errors_pb2.ErrorDetail()
            try:
                detail.ParseFromString(entries[0])
            except DecodeError:
                detail = errors_pb2.ErrorDetail(message="<unparseable ErrorDetail>")
        return Outcome(exc.code(), exc.details() or "", detail, None, time.monotonic() - started)


def describe(service: str, method: str, payload: bytes, metadata=()) -> str:
    """The request of a finding, as hex and (if it parses) as text."""
    shown = payload[:MAX_SHOWN].hex() + ("..." if len(payload) > MAX_SHOWN else "")
    text = ""
    request_type = ALL_TYPES.get((service, method), (None,))[0]
    if request_type is not None:
        try:
            parsed = request_type.FromString(payload)
            text = text_format.MessageToString(parsed, as_one_line=True, print_unknown_fields=True)[:MAX_SHOWN]
        except DecodeError as exc:
            text = f"<does not parse: {exc}>"
    return f"{service}.{method} ({len(payload)} bytes) metadata={list(metadata)!r}\n  hex: {shown}\n  text: {text}"


def verdict(service: str, method: str, payload: bytes, outcome: Outcome, metadata=()) -> None:
    """Assert that ``outcome`` is OK or a precise status; a FINDING otherwise."""
    tally(outcome)
    request = describe(service, method, payload, metadata)
    status = f"{outcome.code.name}: {outcome.details[:500]!r}"
    assert outcome.code in PRECISE, f"FINDING: {status} after {outcome.seconds:.1f}s for\n  {request}"
    if outcome.code == S.OK:
        response_type = ALL_TYPES[service, method][1]
        try:
            response_type.FromString(outcome.body)
        except DecodeError as exc:
            raise AssertionError(
                f"FINDING: OK with an unparseable {response_type.__name__} ({exc}) for\n  {request}"
            ) from None
        return
    assert outcome.detail is not None, f"FINDING: {status} without an ErrorDetail for\n  {request}"
    assert outcome.detail.message == outcome.details, (
        f"FINDING: ErrorDetail message {outcome.detail.message[:200]!r} is not the status's for\n  {request}"
    )


# -- is the daemon still well ---------------------------------------------------------


def serving_epoch(channel: grpc.Channel) -> int:
    reply = channel.unary_unary(path("Cluster", "GetClusterMap"))(b"", timeout=10)
    return cluster_pb2.ClusterMap.FromString(reply).epoch


def assert_serving(address: str) -> None:
    """Health SERVING, and a put then get in a namespace of its own returns the same bytes."""
    assert grpc_serving(address, 10), f"the daemon at {address} is not SERVING"
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        # Routed with the daemon's own epoch: trusted even for a key another member owns.
        routed = (("kvstore-epoch", str(serving_epoch(channel))),)
        ns = data_pb2.Namespace(tenant="alive-" + uuid.uuid4().hex[:12], subtenant="s")
        value = os.urandom(4099)
        put = data_pb2.PutRequest(
            namespace=ns, blocks=[data_pb2.BlockWrite(key=b"alive", value=value, length=len(value), checksum=checksum(value))]
        )
        reply = channel.unary_unary(path("Data", "Put"))(put.SerializeToString(), timeout=30, metadata=routed)
        assert data_pb2.PutResponse.FromString(reply).stored == 1
        get = data_pb2.GetRequest(namespace=ns, keys=[b"alive", b"absent"])
        got = data_pb2.GetResponse.FromString(channel.unary_unary(path("Data", "Get"))(get.SerializeToString(), timeout=30))
        assert [(r.found, r.value) for r in got.results] == [(True, value), (False, b"")]


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


MAX_RSS_GROWTH = 1536 << 20  # generous: the point is unbounded growth, not a budget
MAX_FD_GROWTH = 64


# -- the local channel, by hand -----------------------------------------------------


class LocalSocket:
    """A blocking client of the daemon's local channel (kvstore.protocol.local_channel),
    for sending requests over it as a co-located client would (the daemon then knows
    this process by its peer credentials) and for writing raw frames."""

    def __init__(self, name: str, greet: bool = True, timeout: float = CALL_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(local_channel.socket_address(name))
        self.buffer = bytearray()
        self.ids = itertools.count(1)
        if greet:
            self.sock.sendall(local_channel.PREAMBLE)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "LocalSocket":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def read_frame(self) -> tuple[int, int, int, bytes] | None:
        """(request id, status, epoch, payload) of the next response, None at EOF."""
        head = local_channel.RESPONSE
        while True:
            if len(self.buffer) >= head.size:
                length, request_id, status, epoch = head.unpack_from(self.buffer)
                assert length >= head.size - 4, f"FINDING: response frame with length {length}"
                end = 4 + length
                if len(self.buffer) >= end:
                    payload = bytes(self.buffer[head.size : end])
                    del self.buffer[:end]
                    return request_id, status, epoch, payload
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                assert not self.buffer, f"FINDING: the daemon closed mid-frame ({bytes(self.buffer[:64]).hex()})"
                return None
            self.buffer += chunk

    def call(self, method: str, payload: bytes, timeout: float = 0.0) -> Outcome:
        """One request and its answer, as an Outcome (like ``call`` over gRPC)."""
        request_id = next(self.ids)
        header = local_channel.request_header(request_id, local_channel.NO_EPOCH, timeout, method.encode(), len(payload))
        started = time.monotonic()
        self.sock.sendall(header + payload)
        try:
            frame = self.read_frame()
        except (socket.timeout, TimeoutError):
            return Outcome(S.DEADLINE_EXCEEDED, "no answer on the local channel", None, None, time.monotonic() - started)
        seconds = time.monotonic() - started
        if frame is None:
            return Outcome(S.UNAVAILABLE, "the daemon closed the local channel", None, None, seconds)
        answered, status, _, body = frame
        assert answered == request_id, f"FINDING: answer to request {answered}, expected {request_id}"
        code = BY_NUMBER.get(status, S.UNKNOWN)
        if code == S.OK:
            return Outcome(code, "", None, body, seconds)
        detail = errors_pb2.ErrorDetail()
        try:
            detail.ParseFromString(body)
        except DecodeError:
            detail = None
        return Outcome(code, detail.message if detail else "", detail, None, seconds)


BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
