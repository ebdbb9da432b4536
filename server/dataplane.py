"""The daemon's zero-copy data plane: one UCX worker, the memory-tier arena
registered once at start, and a session per client that introduced itself with
Hello.

The daemon moves every byte itself: for a put it RMA-reads the client's region
into arena extents, for a get it RMA-writes arena extents into the client's
region. Clients receive lengths and checksums, never a daemon rkey nor the
daemon's worker address.

Per request, ``DataPlane.transfer_for`` resolves the client's session and the
request's region and decides once how the bytes move: a ``SharedMemoryTransfer``
or an ``RmaTransfer``, both implementing storage's ``Transfer`` interface
(server/storage/transfer.py). rpc.data hands that object, with the blocks'
client addresses, to ``BlockStore.put_remote``/``get_remote``, which call it
with the arena offsets they reserved or pinned: storage never calls back into
RPC code, and knows nothing of sessions or UCX.

Co-located clients go faster: a region the client allocated as shared memory
(a sealed memfd, kvstore._native.shared_memory) is mapped by the daemon, which
then moves a block with one memcpy between that mapping and the arena, hashing
it on the way (``SharedMemoryTransfer``; on a copy thread with the GIL
released, or on the event loop when the batch is small or its request is the
only one being served). Only client memory is ever shared; the arena stays
private. A mapping lives as long as the client holds the memory: the daemon
watches the client's process (a pidfd) and drops its session when it exits,
and unmaps a region the client closed when it next maps one.

Memory a co-located client allocated itself and registered (an engine's numpy
array, bytearray, pinned tensor, a raw range) cannot be mapped, but it moves
the same way: the daemon reads or writes it in the client's process with
process_vm_readv/writev, hashing each piece as it lands or leaves
(``ProcessMemoryTransfer``, kvstore._native.read_process_blocks). That is
done only for a request that came over the local channel from the process
whose memory it names (``RemoteRegion.pid`` equal to the socket's
SO_PEERCRED pid), and only within the range the request's region names; a
daemon that may not (a stricter ptrace scope: EPERM) moves it by RMA.

That is not an access control on its own: UCX serves software-emulated RMA
(TCP) for any peer that holds an endpoint to a worker, whatever rkey it
presents, and over shared memory a same-user process can read another through
CMA. Tenant isolation on the data plane therefore rests on who may reach the
daemon's worker (network policy, separate users), not on rkeys.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from kvstore import errors
from kvstore.protocol.codes import ErrorCode
from kvstore.server.addresscheck import AddressCheck
from kvstore.server.storage.transfer import Transfer

log = logging.getLogger("kvstore.server.dataplane")

RKEYS_PER_CLIENT = 64  # unpacked remote keys cached per client (one per registered region)
SHARED_PER_CLIENT = 64  # shared-memory regions mapped per client
COPY_THREADS = 4  # concurrent shared-memory copies (each may use 2 threads when large)
PARALLEL_COPY_BYTES = 8 << 20  # a batch this large is copied by 2 threads, while the copies leave a core for each
CPUS = os.cpu_count() or 1
INLINE_COPY_BYTES = 4 << 20  # a batch this small is copied on the event loop (<~0.3 ms): quicker than a thread hop
# ... and one this small too while no other request is being served: handing a
# copy to a thread and waking the loop when it ends costs ~0.25 ms per call,
# and a request that arrives meanwhile waits at most one copy (~2-4 ms).
ALONE_INLINE_COPY_BYTES = 64 << 20
SESSION_SECRET_BYTES = 16
UCS_ERR_INVALID_PARAM = -5
MAX_ADDRESS = (1 << 64) - 1


@dataclass
class ClientSession:
    client_id: str  # what the client calls itself: for logs only, anyone may repeat it
    secret: bytes  # what names the session in requests: handed to this client alone, never logged
    endpoint: object
    # Who said Hello (the guard's principal): only the same credential may use the session.
    owner: str = ""
    source: str = ""  # the host its Hello came from
    # (region_id, rkey bytes, address, length) -> RemoteKey bounded to that range
    rkeys: OrderedDict = field(default_factory=OrderedDict)
    # (token, address) -> SharedMemory, or None when it could not be mapped
    shared: OrderedDict = field(default_factory=OrderedDict)
    pidfd: int = -1  # the client's process, watched once it shared memory or had its memory copied
    # Whether this daemon may copy the memory of the client's process itself
    # (process_vm_readv): None until first tried, then True, or the reason it may not.
    process_copy: bool | str | None = None
    since: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)  # its last request or Hello

    def close(self) -> None:
        for rkey in self.rkeys.values():
            rkey.close()
        self.rkeys.clear()
        self.unmap()
        self.endpoint.close()

    def unmap(self) -> None:
        for mapping in self.shared.values():
            if mapping is not None and not isinstance(mapping, asyncio.Future):
                mapping.close()
        self.shared.clear()
        if self.pidfd >= 0:
            try:
                asyncio.get_running_loop().remove_reader(self.pidfd)
            except RuntimeError:
                pass  # no loop any more: nothing watches it
            os.close(self.pidfd)
            self.pidfd = -1


class DataPlane:
    """UCX worker, registered arena and client sessions; disabled when the native
    module or UCX is unavailable (inline transfers still work then)."""

    def __init__(
        self,
        arena_buffer: memoryview,
        tls: str | None,
        *,
        enabled: bool = True,
        others_waiting: Callable[[], bool] = lambda: True,
        max_sessions: int = 4096,
        session_idle: float = 600.0,
        sessions_per_client: int = 64,
    ) -> None:
        """``arena_buffer``: the memory tier's arena (``BlockStore.arena_buffer()``),
        registered here once; transfers address it by the offsets storage gives.
        At most ``max_sessions`` sessions are held (the least recently used is
        closed past it), none unused for longer than ``session_idle`` seconds."""
        self.tls = tls or ""
        self.max_sessions = max_sessions
        self.sessions_per_client = sessions_per_client
        self.session_idle = session_idle
        self._others_waiting = others_waiting  # whether other requests are being served meanwhile
        self._copying = 0  # shared-memory copies under way (read and written on the event loop only)
        # By secret, least recently used first: each Hello and each use moves one to the end.
        self.sessions: OrderedDict[bytes, ClientSession] = OrderedDict()
        self.enabled = False
        self.process_copy = False  # whether ProcessMemoryTransfer may serve co-located clients
        self.reason = ""
        if not enabled:
            self.reason = "disabled by configuration (data_plane: false)"
            return
        try:
            from kvstore import _native
        except ImportError as exc:  # the package always imports; this is belt and braces
            self.reason = f"kvstore._native cannot be imported: {exc}"
            return
        if not _native.available():
            self.reason = _native.unavailable_reason() or "the native module is unavailable"
            return
        self._native = _native
        self.context = _native.Context(tls or None)
        self.worker = _native.Worker(self.context)
        self.arena_handle = self.context.register(arena_buffer)
        self._arena = arena_buffer
        self._copies = ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="kvstore-copy")
        self.address_check = AddressCheck(tls)
        self.process_copy = sys.platform.startswith("linux") and hasattr(_native, "read_process_blocks")
        self.enabled = True

    def start(self) -> None:
        """Start what must run before the first Hello (the worker-address check), in the background."""
        if self.enabled:
            self.address_check.start()

    async def hello(
        self, client_id: str, worker_address: bytes, previous: bytes = b"", owner: str = "", source: str = ""
    ) -> bytes:
        """Open an endpoint to a client's worker; the secret that names the new
        session, which only ``owner`` may use. ``previous``, a session the same
        client had, is closed. One ``(owner, source host)`` holds at most
        ``sessions_per_client`` sessions: past it its own least recently used
        closes, so a flood of Hellos from one client never evicts another's."""
        if not client_id:
            raise errors.InvalidArgumentError("Hello with a worker address needs a client_id")
        worker_address = bytes(worker_address)
        await self.address_check.check(worker_address)  # UCX would abort on a malformed one
        old = self.sessions.get(previous) if previous else None
        if old is not None and old.client_id == client_id and old.owner == owner:
            self.drop(previous)
        try:
            endpoint = self.worker.connect(worker_address)
        except errors.KVStoreError as exc:
            if getattr(exc, "status", None) == UCS_ERR_INVALID_PARAM:
                # An address the check's child survived but UCX still cannot use: the client's to fix.
                raise errors.InvalidArgumentError(
                    f"the worker address is not one UCX can make an endpoint to: {exc.message}",
                    code=ErrorCode.INVALID_WORKER_ADDRESS,
                ) from None
            raise
        except Exception as exc:
            raise errors.InvalidArgumentError(
                f"cannot reach the client's worker address: {exc}", code=ErrorCode.INVALID_WORKER_ADDRESS
            ) from None
        self._reap()
        group = (owner, source)
        mine = [k for k, s in self.sessions.items() if (s.owner, s.source) == group]
        for oldest in mine[: max(0, len(mine) - self.sessions_per_client + 1)]:
            log.info(
                "closing the least recently used data-plane session of client %s: %d held from %s",
                self.sessions[oldest].client_id, len(mine), source or "its host",
            )
            self.drop(oldest)
        while len(self.sessions) >= self.max_sessions:  # a flood of Hellos cannot hold every fd
            oldest = next(iter(self.sessions))
            log.info(
                "closing the least recently used data-plane session (client %s): %d held",
                self.sessions[oldest].client_id, len(self.sessions),
            )
            self.drop(oldest)
        secret = secrets.token_bytes(SESSION_SECRET_BYTES)
        self.sessions[secret] = ClientSession(client_id, secret, endpoint, owner, source)
        return secret

    def session(self, secret: bytes, owner: str = "") -> ClientSession:
        if not self.enabled:
            raise errors.UnavailableError(
                f"this daemon has no zero-copy data plane ({self.reason}); send values inline",
                code=ErrorCode.DATA_PLANE_UNAVAILABLE,
            )
        session = self.sessions.get(secret) if secret else None
        if session is not None and session.owner != owner:
            session = None  # another credential's session: as good as unknown, and left alone
        elif session is not None and not session.endpoint.failed:
            session.used = time.monotonic()
            self.sessions.move_to_end(secret)
            return session
        elif session is not None:
            self.drop(secret)
        # The secret is not repeated: it may be another client's, mistyped.
        raise errors.SessionLostError(
            "the request names no data-plane session this daemon holds (it restarted, or the session "
            "ended); say Hello again"
        )

    async def transfer_for(
        self, secret: bytes, region, *, put: bool, peer_pid: int | None = None, owner: str = ""
    ) -> Transfer:
        """How the bytes of one request move between the arena and the client's
        ``region`` (a ``RemoteRegion``): over its shared memory when it is shared
        memory this daemon can map, else copied from or into the client's process
        when the request came over the local channel from that process, else by
        RMA. A put whose blocks omit their checksums can only be served by the
        first two (the copy computes them)."""
        session = self.session(secret, owner)
        shared = await self.shared_region(session, region, peer_pid)
        if shared is not None:
            return SharedMemoryTransfer(self, shared)
        omitted = put and (region.shared_memory.checksums_omitted or region.checksums_omitted)
        if self.copies_process(session, region, peer_pid):
            return ProcessMemoryTransfer(self, session, region, omitted)
        if omitted:
            raise errors.InvalidArgumentError(
                "this daemon cannot copy the client's memory itself (it maps no shared memory of it and "
                "the request did not come over the local channel from the process that holds it); "
                "send the blocks' checksums",
                code=ErrorCode.SHARED_MEMORY_UNAVAILABLE,
            )
        return RmaTransfer(self, session, self.remote_key(session, region))

    def rma(self, session: ClientSession, region) -> RmaTransfer:
        return RmaTransfer(self, session, self.remote_key(session, region))

    def copies_process(self, session: ClientSession, region, peer_pid: int | None) -> bool:
        """Whether the blocks of ``region`` are copied from or into the client's
        process by this daemon (``ProcessMemoryTransfer``): only for a request
        that came over the local channel from the process that the region says
        holds it, for a region with a valid range, and while the kernel lets this
        daemon read that process (tried once per session, on its first such request)."""
        if not self.process_copy or not region.pid or peer_pid is None or region.pid != peer_pid:
            return False
        if region.length == 0 or region.address + region.length > MAX_ADDRESS:
            return False  # RMA refuses it with the precise reason
        if session.process_copy is None:
            _, failed, error = self._native.read_process_blocks(peer_pid, bytearray(1), [0], [region.address], [1])
            if failed < 0:
                session.process_copy = True
                self._watch(session, peer_pid)
            elif error == errno.EFAULT:
                return False  # not this region's memory: RMA says what is wrong with it
            else:
                self.refuse_process_copy(session, peer_pid, error)
        return session.process_copy is True

    def refuse_process_copy(self, session: ClientSession, pid: int, error: int) -> None:
        """Move this session's blocks by RMA from now on: the kernel refused to
        let this daemon read or write process ``pid`` (``error``, an errno)."""
        session.process_copy = f"{os.strerror(error)} (errno {errno.errorcode.get(error, error)})"
        log.info(
            "client %s: the memory of process %d is moved by RMA: this daemon may not copy it itself: %s",
            session.client_id, pid, session.process_copy,
        )

    def remote_key(self, session: ClientSession, region):
        """The region's remote key, bounded to the range it names: a transfer
        outside it is refused (with the descriptor's index) before any byte moves."""
        cache_key = (region.region_id, region.rkey, region.address, region.length)
        rkey = session.rkeys.get(cache_key)
        if rkey is not None:
            session.rkeys.move_to_end(cache_key)
            return rkey
        if region.length == 0 or region.address + region.length > MAX_ADDRESS:
            raise errors.InvalidArgumentError(
                f"region {region.region_id} names no valid address range "
                f"(address {region.address}, length {region.length}); RMA needs the registered range"
            )
        try:
            rkey = session.endpoint.unpack_rkey(region.rkey, address=region.address, length=region.length)
        except errors.InvalidArgumentError as exc:
            raise errors.InvalidArgumentError(
                f"region {region.region_id}: {exc.message}", code=ErrorCode.INVALID_REMOTE_KEY
            ) from None
        session.rkeys[cache_key] = rkey
        while len(session.rkeys) > RKEYS_PER_CLIENT:
            _, oldest = session.rkeys.popitem(last=False)
            oldest.close()
        return rkey

    async def shared_region(self, session: ClientSession, region, peer_pid: int | None = None):
        """The client's shared memory behind a request's ``RemoteRegion``, mapped
        here (once per region, off the event loop: mapping populates its page
        tables), or None when the region is not shared memory or this daemon
        cannot map it (then RMA moves its bytes).

        A region is mapped only for the process that holds it: the request must
        come over a connection whose peer (``peer_pid``, the local channel's
        SO_PEERCRED) is the pid the descriptor names. Anyone who can read
        /proc/<pid>/fd can name another process's memfd; only that process is
        on the other end of its own socket."""
        if not region.HasField("shared_memory"):
            return None
        shm = region.shared_memory
        # By the memory, not the region id: naming one memfd under many ids maps it once.
        cache_key = (shm.token, shm.address)
        cached = session.shared.get(cache_key)
        if cached is not None or cache_key in session.shared:
            session.shared.move_to_end(cache_key)
            if isinstance(cached, asyncio.Future):  # another request of this client is mapping it
                return await asyncio.shield(cached)
            return cached
        if peer_pid is None or shm.pid != peer_pid:
            log.debug(
                "client %s: region %d names the memory of pid %d over a connection from %s; read by RMA",
                session.client_id, region.region_id, shm.pid, "an unknown process" if peer_pid is None else f"pid {peer_pid}",
            )
            return None
        from kvstore._native.shared_memory import SharedMemory, SharedMemoryUnavailable

        loop = asyncio.get_running_loop()
        pending = session.shared[cache_key] = loop.create_future()
        self._sweep(session)

        def attach():
            try:
                return SharedMemory.attach(shm.pid, shm.fd, shm.token, shm.length)
            except SharedMemoryUnavailable as exc:
                log.info("client %s: region %d is read by RMA: %s", session.client_id, region.region_id, exc.message)
                return None

        try:
            mapping = await loop.run_in_executor(self._copies, attach)
            if session.shared.get(cache_key) is not pending:  # the session was dropped meanwhile
                if mapping is not None:
                    mapping.close()
                raise errors.UnavailableError("the client's session ended", code=ErrorCode.TRANSFER_FAILED)
        except BaseException:
            if session.shared.get(cache_key) is pending:
                del session.shared[cache_key]
            pending.cancel()  # requests waiting for it fail too; the next one maps again
            raise
        if mapping is not None:
            mapping.address = shm.address
            self._watch(session, shm.pid)
        session.shared[cache_key] = mapping
        pending.set_result(mapping)
        while len(session.shared) > SHARED_PER_CLIENT:
            _, oldest = session.shared.popitem(last=False)
            if oldest is not None and not isinstance(oldest, asyncio.Future):
                oldest.close()
        return mapping

    def _sweep(self, session: ClientSession) -> None:
        """Unmap the regions the client has closed (their fd no longer holds them)."""
        for cache_key, mapping in list(session.shared.items()):
            if mapping is not None and not isinstance(mapping, asyncio.Future) and not mapping.still_held():
                del session.shared[cache_key]
                mapping.close()

    def _watch(self, session: ClientSession, pid: int) -> None:
        """Drop the session as soon as the client's process exits, so nothing it
        shared stays mapped here."""
        if session.pidfd >= 0 or not hasattr(os, "pidfd_open"):
            return
        try:
            session.pidfd = os.pidfd_open(pid)
        except OSError:
            return  # gone already, or not allowed: sweeps and the endpoint's failure still clean up
        def exited() -> None:
            if self.sessions.get(session.secret) is session:
                log.info("client %s exited; its session and shared memory are released", session.client_id)
                self.drop(session.secret)
            else:
                session.unmap()

        asyncio.get_running_loop().add_reader(session.pidfd, exited)

    async def _copy(self, destination, destination_offsets, source, source_offsets, sizes) -> list[int]:
        if not sizes:
            return []
        if destination is None or source is None:
            raise errors.UnavailableError("the client's shared memory was released", code=ErrorCode.TRANSFER_FAILED)
        total = sum(sizes)
        # More copy threads than cores only slow every copy down.
        threads = 2 if total >= PARALLEL_COPY_BYTES and 2 * (self._copying + 1) <= CPUS else 1

        def copy() -> list[int]:
            return self._native.copy_blocks(destination, destination_offsets, source, source_offsets, sizes, threads=threads)

        self._copying += 1
        try:
            if total <= INLINE_COPY_BYTES or (total <= ALONE_INLINE_COPY_BYTES and not self._others_waiting()):
                return copy()
            return await asyncio.get_running_loop().run_in_executor(self._copies, copy)
        except errors.InvalidArgumentError as exc:
            if exc.index < 0:  # the mapping itself is gone (the session was dropped meanwhile)
                raise errors.UnavailableError(
                    f"the client's shared memory was released: {exc.message}", code=ErrorCode.TRANSFER_FAILED
                ) from None
            raise errors.InvalidArgumentError(
                f"a block lies outside the client's shared memory: {exc.message}", index=exc.index
            ) from None
        finally:
            self._copying -= 1

    async def _process_copy(self, read: bool, pid: int, arena_offsets, addresses, sizes) -> tuple[list[int], int, int]:
        """Blocks copied between the arena and process ``pid`` (as ``_copy``: on the
        event loop when small, else on a copy thread, by 2 threads when large);
        ``(checksums, failed, errno)`` as kvstore._native.read_process_blocks."""
        if not sizes:
            return [], -1, 0
        total = sum(sizes)
        threads = 2 if total >= PARALLEL_COPY_BYTES and 2 * (self._copying + 1) <= CPUS else 1
        native = self._native.read_process_blocks if read else self._native.write_process_blocks

        def copy() -> tuple[list[int], int, int]:
            return native(pid, self._arena, arena_offsets, addresses, sizes, threads=threads)

        self._copying += 1
        try:
            if total <= INLINE_COPY_BYTES or (total <= ALONE_INLINE_COPY_BYTES and not self._others_waiting()):
                return copy()
            return await asyncio.get_running_loop().run_in_executor(self._copies, copy)
        finally:
            self._copying -= 1

    async def _transfer(self, session, op, rkey, arena_offsets, remote_addresses, sizes) -> None:
        if not sizes:
            return
        try:
            await getattr(session.endpoint, op)(
                self.arena_handle, list(arena_offsets), list(remote_addresses), list(sizes), rkey
            )
        except errors.InvalidArgumentError:
            if self.sessions.get(session.secret) is not session:
                # A new Hello replaced this session (and closed its keys) mid-request.
                raise errors.SessionLostError(
                    f"client {session.client_id!r} said Hello again during the transfer; resend with the new session"
                ) from None
            raise
        except errors.KVStoreError as exc:
            if session.endpoint.failed:
                # The client died or its endpoint broke: forget it; it must Hello again.
                self.drop(session.secret)
            # Otherwise this request failed, not the session: the next one may use it.
            raise errors.UnavailableError(
                f"transfer with client {session.client_id!r} failed: {exc.message}", code=ErrorCode.TRANSFER_FAILED
            ) from None

    def drop(self, secret: bytes) -> None:
        session = self.sessions.pop(secret, None)
        if session is not None:
            try:
                session.close()
            except Exception:
                log.debug("closing the session of %s failed", session.client_id, exc_info=True)

    def _reap(self) -> None:
        """Close failed sessions and those unused for longer than ``session_idle``."""
        stale = time.monotonic() - self.session_idle
        for secret in [k for k, s in self.sessions.items() if s.endpoint.failed or s.used < stale]:
            self.drop(secret)

    async def close(self) -> None:
        if not self.enabled:
            return
        await self.address_check.close()
        for secret in list(self.sessions):
            self.drop(secret)
        self.arena_handle.close()
        self.worker.close(timeout=5)  # let transfers in flight finish before endpoints go
        self._copies.shutdown(wait=True)
        self.enabled = False


class SharedMemoryTransfer:
    """A request's blocks copied between the arena and the client's shared memory,
    one memcpy each, hashed on the way (storage's ``Transfer``, with checksums).
    Small batches are copied on the event loop, others on a copy thread
    (``DataPlane._copy``)."""

    __slots__ = ("_plane", "_mapping")
    checksums_while_copying = True

    def __init__(self, plane: DataPlane, mapping) -> None:
        self._plane = plane
        self._mapping = mapping

    async def read_into_arena(self, arena_offsets, remote_addresses, sizes) -> list[int]:
        """Copy blocks of the client's shared memory into arena extents; the xxh3-64 of each."""
        offsets = self._offsets(remote_addresses)
        return await self._plane._copy(self._plane._arena, list(arena_offsets), self._mapping.buffer, offsets, list(sizes))

    async def write_from_arena(self, arena_offsets, remote_addresses, lengths) -> list[int]:
        """Copy arena extents into the client's shared memory; the xxh3-64 of each block's arena bytes."""
        offsets = self._offsets(remote_addresses)
        return await self._plane._copy(self._mapping.buffer, offsets, self._plane._arena, list(arena_offsets), list(lengths))

    def _offsets(self, remote_addresses) -> list[int]:
        """Where the client's addresses lie in the mapping; one before its start or
        past its end is refused here (the copy checks each block's end)."""
        mapping = self._mapping
        offsets = [address - mapping.address for address in remote_addresses]
        for index, offset in enumerate(offsets):
            if not 0 <= offset <= mapping.length:
                raise errors.InvalidArgumentError(
                    f"a block lies outside the client's shared memory: address {remote_addresses[index]:#x} is not "
                    f"within [{mapping.address:#x}, +{mapping.length})",
                    index=index,
                )
        return offsets


class RmaTransfer:
    """A request's blocks moved by RMA through the client's endpoint and the
    region's remote key (storage's ``Transfer``, without checksums)."""

    __slots__ = ("_plane", "_session", "_rkey")
    checksums_while_copying = False

    def __init__(self, plane: DataPlane, session: ClientSession, rkey) -> None:
        self._plane = plane
        self._session = session
        self._rkey = rkey

    async def read_into_arena(self, arena_offsets, remote_addresses, sizes) -> None:
        """RMA-read client bytes into arena extents."""
        await self._plane._transfer(self._session, "get_async", self._rkey, arena_offsets, remote_addresses, sizes)

    async def write_from_arena(self, arena_offsets, remote_addresses, lengths) -> None:
        """RMA-write arena extents into the client's region, flushed before returning."""
        await self._plane._transfer(self._session, "put_async", self._rkey, arena_offsets, remote_addresses, lengths)


class ProcessMemoryTransfer:
    """A request's blocks copied between the arena and the memory of the client's
    own process (process_vm_readv/writev), hashed on the way (storage's
    ``Transfer``, with checksums): for memory a co-located client registered
    that the daemon cannot map. Every block must lie within the range the
    request's region names. Where the kernel refuses the copy (EPERM), the
    blocks move by RMA instead, and then without checksums; a put that omitted
    its checksums is refused then with SHARED_MEMORY_UNAVAILABLE (the client
    resends it with them)."""

    __slots__ = ("_plane", "_session", "_region", "_omitted", "checksums_while_copying")

    def __init__(self, plane: DataPlane, session: ClientSession, region, omitted: bool) -> None:
        self._plane = plane
        self._session = session
        self._region = region
        self._omitted = omitted
        self.checksums_while_copying = True

    async def read_into_arena(self, arena_offsets, remote_addresses, sizes) -> list[int] | None:
        """Copy blocks of the client's memory into arena extents; the xxh3-64 of each."""
        return await self._move(True, list(arena_offsets), list(remote_addresses), list(sizes))

    async def write_from_arena(self, arena_offsets, remote_addresses, lengths) -> list[int] | None:
        """Copy arena extents into the client's memory; the xxh3-64 of each block's arena bytes."""
        return await self._move(False, list(arena_offsets), list(remote_addresses), list(lengths))

    async def _move(self, read: bool, arena_offsets: list[int], addresses: list[int], sizes: list[int]) -> list[int] | None:
        region = self._region
        start, end = region.address, region.address + region.length
        for index, (address, size) in enumerate(zip(addresses, sizes)):
            if not start <= address <= end or size > end - address:
                raise errors.InvalidArgumentError(
                    f"block {index}: [{address:#x}, +{size}) lies outside the region {region.region_id} "
                    f"[{start:#x}, +{region.length}) the request names",
                    index=index,
                )
        if self._session.process_copy is True:
            checksums, failed, error = await self._plane._process_copy(read, region.pid, arena_offsets, addresses, sizes)
            if failed < 0:
                return checksums
            if error == errno.EFAULT:
                raise errors.InvalidArgumentError(
                    f"block {failed}: the client's memory at [{addresses[failed]:#x}, +{sizes[failed]}) cannot be "
                    f"{'read' if read else 'written'}: it is not mapped in process {region.pid}",
                    index=failed,
                )
            if error == errno.ESRCH:
                raise errors.UnavailableError(
                    f"process {region.pid} of client {self._session.client_id!r} is gone", code=ErrorCode.TRANSFER_FAILED
                )
            if error not in (errno.EPERM, errno.EACCES):
                raise errors.UnavailableError(
                    f"copying block {failed} {'from' if read else 'to'} process {region.pid} failed: "
                    f"{os.strerror(error)}",
                    code=ErrorCode.TRANSFER_FAILED,
                )
            self._plane.refuse_process_copy(self._session, region.pid, error)
        # The kernel refused (or refused before, for another request): by RMA.
        if self._omitted:
            raise errors.InvalidArgumentError(
                f"this daemon may not copy the memory of process {region.pid} ({self._session.process_copy}); "
                "send the blocks' checksums",
                code=ErrorCode.SHARED_MEMORY_UNAVAILABLE,
            )
        self.checksums_while_copying = False
        rma = self._plane.rma(self._session, region)
        if read:
            await rma.read_into_arena(arena_offsets, addresses, sizes)
        else:
            await rma.write_from_arena(arena_offsets, addresses, sizes)
        return None
