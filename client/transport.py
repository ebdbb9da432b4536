"""gRPC channels to daemons, and the one place where gRPC failures become
``kvstore.errors`` exceptions (``translate``)."""

from __future__ import annotations

import grpc

from kvstore import errors
from kvstore._proto.v1 import admin_pb2_grpc, cluster_pb2, cluster_pb2_grpc, data_pb2_grpc, errors_pb2

ERROR_DETAIL_KEY = "kvstore-error-bin"

_BY_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.InvalidArgumentError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.CANCELLED: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: errors.PermissionDeniedError,
    grpc.StatusCode.DATA_LOSS: errors.DataCorruptionError,
}


def translate(exc: grpc.RpcError, endpoint: str) -> errors.KVStoreError:
    """The kvstore exception for a failed call, with the daemon's ErrorDetail if it sent one."""
    status = exc.code()
    message = exc.details() or status.name
    code = None
    index = -1
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_DETAIL_KEY:
            detail = errors_pb2.ErrorDetail.FromString(value)
            code = errors_pb2.ErrorCode.Name(detail.code) if detail.code else None
            index = detail.index
            message = detail.message or message
    cls = _BY_STATUS.get(status, errors.InternalError)
    if code == "WRONG_NODE":
        cls = errors.WrongNodeError
    if cls is errors.UnavailableError and code is None:
        code = "ERROR_CODE_UNSPECIFIED"
    return cls(f"{message} [{status.name} from {endpoint}]", code=code, index=index)


class Connection:
    """One channel to one daemon with its service stubs and the limits it announced."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.channel = grpc.aio.insecure_channel(
            endpoint,
            options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
                ("grpc.enable_retries", 0),
                # A restarted daemon must be usable again at once, not after
                # gRPC's default reconnect backoff (1 s, growing to 2 min).
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self.data = data_pb2_grpc.DataStub(self.channel)
        self.cluster = cluster_pb2_grpc.ClusterStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.hello: cluster_pb2.HelloResponse | None = None
        # Counts successful handshakes, so that concurrent callers who saw the
        # same lost session say Hello again only once.
        self.generation = 0

    @property
    def zero_copy(self) -> bool:
        """Whether the daemon opened a data-plane endpoint to this client."""
        return bool(self.hello and self.hello.data_plane)

    async def handshake(
        self, client_id: str, timeout: float, worker_address: bytes = b"", *, wait: bool = True
    ) -> cluster_pb2.HelloResponse:
        """Introduce the client (and its data-plane worker, if any) to the daemon.

        ``wait`` keeps trying to connect until the timeout (a daemon that is
        still starting); without it an unreachable daemon fails at once."""
        from kvstore import __version__

        try:
            self.hello = await self.cluster.Hello(
                cluster_pb2.HelloRequest(client_id=client_id, client_version=__version__, worker_address=worker_address),
                timeout=timeout,
                wait_for_ready=wait,
            )
        except grpc.RpcError as exc:
            raise translate(exc, self.endpoint) from None
        self.generation += 1
        return self.hello

    async def close(self) -> None:
        await self.channel.close()
