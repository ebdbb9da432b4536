"""The native data plane: UCX memory registration and batched one-sided transfers.

    Context(tls)                        one per process role: UCX transports, memory domains
    ├── register(buffer)        -> MemoryHandle   any writable buffer-protocol object
    └── register_ptr(addr, len) -> MemoryHandle   a raw range the caller keeps alive
    Worker(context)                     a UCX worker and the native thread progressing it
    └── connect(address)        -> Endpoint       to a peer's (or its own) worker address
        ├── unpack_rkey(packed) -> RemoteKey      a peer's MemoryHandle.packed_rkey
        ├── get / put                             batch of descriptors, callback(status, message)
        └── get_async / put_async                 the same, awaited on the running loop
    xxh3(handle, offset, length)        checksum of registered memory, without a copy
    copy_blocks(dst, ..., src, ...)     block copies between two local buffers, hashed on the way
    read_process_blocks(pid, ...)       another process's memory into a local buffer, hashed (CMA)
    write_process_blocks(pid, ...)      a local buffer into another process's memory, hashed (CMA)
    shared_memory.SharedMemory          client memory a co-located daemon maps (memfd)

The compiled part is ``kvstore._native._ext`` (``src/``: a UCX-only C++ core and
one nanobind shim). Importing this package never fails: when UCX or the
extension cannot be loaded, ``available()`` is False, ``unavailable_reason()``
says why, and constructing a ``Context`` raises ``TransportError`` with code
``DATA_PLANE_UNAVAILABLE``.

UCX is loaded with ``libucx.load_library()`` before the extension, so
``RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true`` selects a system UCX (one built
with verbs for RDMA) over the wheel's. Transports are chosen per context
(``Context(tls=...)``) or by UCX's own ``UCX_*`` environment variables; this
module never changes the environment.

Failures are kvstore.errors classes, one per UCX failure family:

    UnavailableError
    └── TransportError              any other transport failure        (TRANSFER_FAILED)
        └── EndpointClosedError     peer died, link broke, endpoint or worker closed
    DeadlineExceededError
    └── TransportTimeoutError       UCX timed out                       (TRANSFER_FAILED)
    ResourceExhaustedError
    └── RegistrationError           no memory/resources to register     (CAPACITY_EXHAUSTED)
    InvalidArgumentError            bad descriptors, read-only buffers  (INVALID_ARGUMENT)
    └── InvalidRemoteKeyError       corrupted, truncated or foreign packed remote key

Each carries ``status``, the UCX status code (an int, negative), when UCX
reported one. A peer that dies mid-transfer surfaces as EndpointClosedError,
or as TransportError when the copy itself failed first (CMA reports an I/O
error); ``Endpoint.failed`` then tells that the endpoint is gone for good.

Trust: UCX assumes its peers are trusted. A process holding an endpoint to a
worker can read and write any memory of that worker's process through UCX's
software-emulated RMA, without a valid remote key (and, same user, through
CMA). The remote-key framing and checks below catch corruption and
truncation; they are not an access control.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import struct
import weakref
from collections.abc import Callable, Mapping, Sequence

import xxhash

from kvstore import errors
from kvstore.protocol.codes import ErrorCode

__all__ = [
    "Context",
    "Endpoint",
    "EndpointClosedError",
    "InvalidRemoteKeyError",
    "MemoryHandle",
    "RegistrationError",
    "RemoteKey",
    "TransportError",
    "TransportTimeoutError",
    "Worker",
    "available",
    "copy_blocks",
    "error_for_status",
    "read_process_blocks",
    "unavailable_reason",
    "write_process_blocks",
    "xxh3",
]


# The data plane's exceptions belong to the one error tree in kvstore.errors.
TransportError = errors.TransportError
EndpointClosedError = errors.EndpointClosedError
TransportTimeoutError = errors.TransportTimeoutError
RegistrationError = errors.RegistrationError
InvalidRemoteKeyError = errors.InvalidRemoteKeyError


# Completion callback: callback(status, message), status 0 meaning success.
Callback = Callable[[int, str], None]


def _load():
    """Load UCX, then the extension; return (module, None) or (None, reason).
    Any failure only makes the data plane unavailable: the SDK and the daemon
    import this module unconditionally."""
    try:
        import libucx
    except Exception as exc:
        return None, f"the libucx wheel cannot be imported ({exc!r})"
    try:
        # Preloads libucs/libucp (RTLD_LOCAL); the extension binds to them.
        libucx.load_library()
    except Exception as exc:
        return None, f"cannot load the UCX libraries ({exc!r})"
    try:
        from kvstore._native import _ext
    except Exception as exc:
        return None, f"cannot import the compiled extension kvstore._native._ext ({exc!r})"
    return _ext, None


_ext, _UNAVAILABLE_REASON = _load()

if _ext is not None:
    _FAMILY_ERRORS: dict[int, type[errors.KVStoreError]] = {
        _ext.FAMILY_TRANSPORT: TransportError,
        _ext.FAMILY_ENDPOINT_CLOSED: EndpointClosedError,
        _ext.FAMILY_TIMED_OUT: TransportTimeoutError,
        _ext.FAMILY_REGISTRATION: RegistrationError,
        _ext.FAMILY_INVALID_ARGUMENT: errors.InvalidArgumentError,
        _ext.FAMILY_INVALID_REMOTE_KEY: InvalidRemoteKeyError,
    }
    # Native exceptions are raised directly as these classes.
    _ext.set_error_classes(_FAMILY_ERRORS)


def available() -> bool:
    """Whether the native data plane can be used in this process."""
    return _ext is not None


def unavailable_reason() -> str | None:
    """Why the native data plane cannot be used, or None if it can."""
    return _UNAVAILABLE_REASON


def _require():
    if _ext is None:
        raise TransportError(
            f"the native data plane is unavailable: {_UNAVAILABLE_REASON}",
            code=ErrorCode.DATA_PLANE_UNAVAILABLE,
        )
    return _ext


def error_for_status(status: int, message: str = "") -> errors.KVStoreError:
    """The exception for a failed UCX status code, as passed to completion callbacks."""
    ext = _require()
    cls = _FAMILY_ERRORS[ext.status_family(status)]
    exc = cls(message or ext.status_string(status))
    exc.status = status
    return exc


# --- packed remote keys ------------------------------------------------------
# MemoryHandle.packed_rkey = b"KVRK" + u32 length + u64 xxh3-64 of UCX's bytes
# + UCX's bytes (little-endian). UCX trusts its rkey bytes blindly, so
# unpack_rkey checks all three before UCX sees anything.

_RKEY_MAGIC = b"KVRK"
_RKEY_HEADER = struct.Struct("<4sIQ")


def _frame_rkey(raw: bytes) -> bytes:
    return _RKEY_HEADER.pack(_RKEY_MAGIC, len(raw), xxhash.xxh3_64_intdigest(raw)) + raw


def _unframe_rkey(packed) -> bytes:
    try:
        data = bytes(packed)
    except TypeError as exc:
        raise InvalidRemoteKeyError(f"a packed remote key must be bytes, not {type(packed).__name__}") from exc
    if len(data) <= _RKEY_HEADER.size:
        raise InvalidRemoteKeyError(f"packed remote key truncated: {len(data)} bytes")
    magic, length, digest = _RKEY_HEADER.unpack_from(data)
    if magic != _RKEY_MAGIC:
        raise InvalidRemoteKeyError("not a packed remote key (bad magic)")
    raw = data[_RKEY_HEADER.size :]
    if length != len(raw):
        raise InvalidRemoteKeyError(f"packed remote key truncated: {len(raw)} of {length} bytes")
    if xxhash.xxh3_64_intdigest(raw) != digest:
        raise InvalidRemoteKeyError("packed remote key corrupted: checksum mismatch")
    return raw


# --- public classes ----------------------------------------------------------


class Context:
    """UCX transports and memory domains for one process role (daemon, client)."""

    def __init__(self, tls: str | None = None, *, settings: Mapping[str, str] | None = None) -> None:
        """``tls`` is a UCX transport list such as ``"shm,tcp"``, ``"tcp"`` or
        ``"all"``; None uses UCX's default (its ``UCX_TLS`` variable, else all).
        ``settings`` are further UCX variables without the ``UCX_`` prefix, e.g.
        ``{"NET_DEVICES": "lo"}``. Both apply to this context alone and win
        over the ``UCX_*`` environment.

        Endpoints handle peer failure, so every one needs a transport that can
        detect it for its control messages: TCP here (or an RDMA transport of a
        system UCX). Shared memory contributes CMA, zero-copy reads and writes
        of the peer's memory; UCX's posix/sysv/self transports cannot detect a
        dead peer and are not used. Hence ``"shm"`` alone cannot connect, while
        ``"tcp"`` and ``"shm,tcp"`` work between processes and for a worker
        connecting to itself."""
        ext = _require()
        self.tls: str = tls or ""
        self.settings: dict[str, str] = {str(k): str(v) for k, v in (settings or {}).items()}
        self._native = ext.Context(self.tls, list(self.settings.items()))

    def register(self, buffer) -> MemoryHandle:
        """Register a writable buffer-protocol object (bytearray, numpy array,
        mmap, memoryview of those). The handle keeps the buffer exported, so it
        cannot be resized or freed, until the handle is closed and no transfer
        uses it. Read-only or non-contiguous buffers raise InvalidArgumentError."""
        return MemoryHandle(_ext.register_buffer(self._native, buffer))

    def register_ptr(self, address: int, length: int) -> MemoryHandle:
        """Register a raw range (an engine's pinned pool); the caller keeps it alive
        until the handle is closed and every transfer using it has completed."""
        if not isinstance(address, int) or not isinstance(length, int) or address <= 0 or length <= 0:
            raise errors.InvalidArgumentError(f"invalid memory range: address={address!r}, length={length!r}")
        return MemoryHandle(_ext.register_ptr(self._native, address, length))

    def __repr__(self) -> str:
        return f"Context(tls={self.tls!r})"


class _Closable:
    """What every wrapper shares: ``with`` closes it, and ``_open`` refuses a closed one."""

    __slots__ = ()
    _kind = "object"

    def _open(self):
        native = self._native
        if native is None:
            raise errors.InvalidArgumentError(f"the {self._kind} is closed")
        return native

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class MemoryHandle(_Closable):
    """A registered range of local memory and its packed remote key."""

    __slots__ = ("__weakref__", "_native", "_packed_rkey", "address", "length")
    _kind = "memory handle"

    def __init__(self, native) -> None:
        self._native = native
        self.address: int = native.address
        self.length: int = native.length
        self._packed_rkey: bytes | None = None

    @property
    def packed_rkey(self) -> bytes:
        """The remote key a peer passes to ``Endpoint.unpack_rkey`` (framed; see above)."""
        if self._packed_rkey is None:
            self._packed_rkey = _frame_rkey(self._open().packed_rkey)
        return self._packed_rkey

    @property
    def closed(self) -> bool:
        return self._native is None

    def close(self) -> None:
        """Unregister the range (ucp_mem_unmap) and release the buffer. Idempotent.
        A transfer still in flight keeps the registration until it completes."""
        self._native = None



    def __repr__(self) -> str:
        state = "closed" if self._native is None else "open"
        return f"MemoryHandle(address={self.address:#x}, length={self.length}, {state})"


class RemoteKey(_Closable):
    """A peer's remote key, unpacked for one endpoint."""

    __slots__ = ("_native", "endpoint")
    _kind = "remote key"

    def __init__(self, endpoint: Endpoint, native) -> None:
        self.endpoint = endpoint
        self._native = native

    def close(self) -> None:
        """Release the key. Idempotent; transfers in flight keep it until they complete."""
        self._native = None




_live_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


@atexit.register
def _close_workers() -> None:
    # Progress threads must be gone before the interpreter tears down: a
    # native thread that then tries to take the GIL is killed mid-callback.
    for worker in list(_live_workers):
        worker.close()


class Worker(_Closable):
    """A UCX worker and the native thread that progresses it; completions of
    transfers posted on its endpoints are delivered from that thread."""

    def __init__(self, context: Context, *, busy_poll_us: int = 50, wait_timeout_ms: int = 2) -> None:
        """``busy_poll_us``: how long the progress thread keeps polling after the
        last activity before sleeping on the worker's event fd (latency against
        CPU). ``wait_timeout_ms``: the longest such sleep, a safety net against a
        missed wakeup."""
        self.context = context
        self._native = _require().Worker(context._native, busy_poll_us, wait_timeout_ms)
        self.address: bytes = self._native.address
        _live_workers.add(self)

    def connect(self, address: bytes) -> Endpoint:
        """An endpoint to the worker whose ``address`` this is (possibly this one)."""
        if not isinstance(address, (bytes, bytearray, memoryview)) or len(address) == 0:
            raise errors.InvalidArgumentError("a worker address must be non-empty bytes")
        return Endpoint(self, self._native.connect(bytes(address)))

    @property
    def closed(self) -> bool:
        return self._native.closed

    def close(self, timeout: float = 0.0) -> None:
        """Stop the progress thread, fail every pending transfer (their callbacks
        run with EndpointClosedError), close the endpoints and destroy the worker.
        Idempotent.

        With a ``timeout`` (seconds), first wait up to that long for transfers in
        flight to complete. Prefer it for an orderly shutdown over TCP: there a
        peer answers our reads with messages, and UCX (1.22) crashes a process
        whose endpoint fails while such a reply is still queued."""
        self._native.close(timeout)


    def __del__(self) -> None:
        native = getattr(self, "_native", None)
        if native is not None:
            native.close()

    def __repr__(self) -> str:
        return f"Worker(context={self.context!r}, closed={self.closed})"


def _future_callback(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> Callback:
    """A completion callback (run on the progress thread) that settles ``future``
    on its loop; a closed loop or an already settled (cancelled) future is ignored."""

    def on_complete(status: int, message: str) -> None:
        try:
            loop.call_soon_threadsafe(_settle, future, status, message)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    return on_complete


def _settle(future: asyncio.Future, status: int, message: str) -> None:
    if future.done():
        return
    if status == 0:
        future.set_result(None)
    else:
        future.set_exception(error_for_status(status, message))


class Endpoint(_Closable):
    """A connection to a peer worker, for one-sided transfers into and out of
    the peer's registered memory."""

    __slots__ = ("_native", "worker")

    def __init__(self, worker: Worker, native) -> None:
        self.worker = worker  # keeps the worker (and its progress thread) alive
        self._native = native

    @property
    def failed(self) -> bool:
        """True once the peer has died or the connection has broken."""
        return self._native.failed

    @property
    def closed(self) -> bool:
        return self._native.closed

    @property
    def transports(self) -> list[tuple[str, str]]:
        """(transport, device) of each lane UCX selected, e.g. ``("cma", "memory")``
        for zero-copy shared memory, ``("tcp", "lo")``; complete once the first
        transfer has run (connection establishment may add lanes)."""
        return self._native.transports

    def unpack_rkey(self, packed: bytes, *, address: int | None = None, length: int | None = None) -> RemoteKey:
        """Unpack a peer's ``MemoryHandle.packed_rkey`` for this endpoint. Raises
        InvalidRemoteKeyError if it is corrupted or truncated. When the peer's
        region (``address``, ``length``) is given, transfers are checked to stay
        inside it."""
        raw = _unframe_rkey(packed)
        if (address is None) != (length is None):
            raise errors.InvalidArgumentError("give both the region's address and length, or neither")
        if length is not None and (address < 0 or length <= 0):
            raise errors.InvalidArgumentError(f"invalid remote region: address={address!r}, length={length!r}")
        native = self._native.unpack_rkey(raw, address or 0, length or 0)
        return RemoteKey(self, native)

    def get(
        self,
        local: MemoryHandle,
        local_offsets: Sequence[int],
        remote_addresses: Sequence[int],
        sizes: Sequence[int],
        rkey: RemoteKey,
        callback: Callback,
    ) -> None:
        """Read ``sizes[i]`` bytes at ``remote_addresses[i]`` of the peer into
        ``local`` at ``local_offsets[i]``, for every i, as one batch. Bad
        descriptors raise InvalidArgumentError before anything is posted.
        ``callback(status, message)`` runs once, on the progress thread with the
        GIL held, after every operation has settled: status 0 on success, else
        the first failure's UCX status (see ``error_for_status``)."""
        self._native.get(local._open(), local_offsets, remote_addresses, sizes, rkey._open(), callback)

    def put(
        self,
        local: MemoryHandle,
        local_offsets: Sequence[int],
        remote_addresses: Sequence[int],
        sizes: Sequence[int],
        rkey: RemoteKey,
        callback: Callback,
    ) -> None:
        """Write ``local`` at ``local_offsets[i]`` to the peer at
        ``remote_addresses[i]`` (``sizes[i]`` bytes each); the callback runs once
        the bytes are visible at the peer. Otherwise as ``get``."""
        self._native.put(local._open(), local_offsets, remote_addresses, sizes, rkey._open(), callback)

    async def get_async(
        self,
        local: MemoryHandle,
        local_offsets: Sequence[int],
        remote_addresses: Sequence[int],
        sizes: Sequence[int],
        rkey: RemoteKey,
    ) -> None:
        """``get``, awaited: raises the failure's kvstore.errors class. Cancelling
        the await does not stop the transfer; the registration stays in use
        until it completes."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.get(local, local_offsets, remote_addresses, sizes, rkey, _future_callback(loop, future))
        await future

    async def put_async(
        self,
        local: MemoryHandle,
        local_offsets: Sequence[int],
        remote_addresses: Sequence[int],
        sizes: Sequence[int],
        rkey: RemoteKey,
    ) -> None:
        """``put``, awaited; as ``get_async``."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.put(local, local_offsets, remote_addresses, sizes, rkey, _future_callback(loop, future))
        await future

    def close(self, timeout: float = 0.0) -> None:
        """Force-close the endpoint: transfers in flight fail with
        EndpointClosedError. Idempotent. With a ``timeout`` (seconds), first wait
        up to that long for them to complete (see ``Worker.close``); not from a
        completion callback, where it closes at once."""
        self._native.close(timeout)



def xxh3(handle: MemoryHandle, offset: int, length: int) -> int:
    """xxh3-64 of ``length`` registered bytes at ``offset`` of ``handle``, read in
    place (equal to ``xxhash.xxh3_64_intdigest`` of the same bytes)."""
    native = handle._open()  # held: keeps the registration (and buffer) alive meanwhile
    if offset < 0 or length < 0 or offset > handle.length or length > handle.length - offset:
        raise errors.InvalidArgumentError(
            f"range [{offset}, +{length}) exceeds the memory handle of {handle.length} bytes"
        )
    if length == 0:
        return xxhash.xxh3_64_intdigest(b"")
    view = (ctypes.c_char * length).from_address(native.address + offset)
    return xxhash.xxh3_64_intdigest(view)


def copy_blocks(
    destination,
    destination_offsets: Sequence[int],
    source,
    source_offsets: Sequence[int],
    sizes: Sequence[int],
    *,
    threads: int = 1,
) -> list[int]:
    """Copy ``sizes[i]`` bytes from ``source`` at ``source_offsets[i]`` to
    ``destination`` at ``destination_offsets[i]`` for every i, and return the
    xxh3-64 of each range (hashed while its bytes are in cache). Both are
    buffer-protocol objects (an mmap, a memoryview of the arena); they stay
    exported during the copy, which runs with the GIL released, on up to
    ``threads`` threads for a large batch. Ranges outside either buffer raise
    InvalidArgumentError (naming the index) before anything is copied."""
    return _require().copy_blocks(
        destination, list(destination_offsets), source, list(source_offsets), list(sizes), max(1, int(threads))
    )


def read_process_blocks(
    pid: int, destination, destination_offsets: Sequence[int], addresses: Sequence[int], sizes: Sequence[int], *, threads: int = 1
) -> tuple[list[int], int, int]:
    """Read ``sizes[i]`` bytes at ``addresses[i]`` of process ``pid`` into
    ``destination`` (a writable buffer) at ``destination_offsets[i]`` with
    process_vm_readv, hashing each piece right after it lands, with the GIL
    released, on up to ``threads`` threads for a large batch.

    Returns ``(checksums, failed, errno)``: the xxh3-64 of each block, and -1
    and 0, or the index of the first block that could not be read and the
    errno of its system call (EFAULT: not mapped there; EPERM: this process may
    not read that one; ESRCH: it is gone). The caller bounds the addresses; a
    range outside ``destination`` raises InvalidArgumentError before any byte moves."""
    return _require().read_process_blocks(
        pid, destination, list(destination_offsets), list(addresses), list(sizes), max(1, int(threads))
    )


def write_process_blocks(
    pid: int, source, source_offsets: Sequence[int], addresses: Sequence[int], sizes: Sequence[int], *, threads: int = 1
) -> tuple[list[int], int, int]:
    """Write ``sizes[i]`` bytes of ``source`` at ``source_offsets[i]`` to
    ``addresses[i]`` of process ``pid`` with process_vm_writev, hashing each
    piece just before it leaves; as ``read_process_blocks`` otherwise (the
    checksums are of the source bytes)."""
    return _require().write_process_blocks(
        pid, source, list(source_offsets), list(addresses), list(sizes), max(1, int(threads))
    )
