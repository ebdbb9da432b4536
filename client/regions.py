"""Registered memory on the client side: ``MemoryRegion`` (a buffer the caller
registered once and reuses across requests, or memory the SDK allocated for
it) and ``StagingPool`` (the SDK's own region that plain put/get copy through
on the zero-copy path).

A region works with or without the native module: with it, the daemon moves
bytes by RMA; without it, the SDK copies them through inline messages.
Memory the SDK allocates (``allocate_region``, ``Client.allocate``) is also
shared memory: a daemon on the same host maps it and copies each block with
one memcpy instead of RMA (kvstore._native.shared_memory).
"""

from __future__ import annotations

import asyncio
import itertools
import mmap
import os

from kvstore import errors
from kvstore._proto.v1 import data_pb2
from kvstore.checksum import checksum
from kvstore.extents import ExtentAllocator

_region_ids = itertools.count(1)


class MemoryRegion:
    """A buffer (or raw address range) registered with the client's data plane."""

    def __init__(self, buffer, handle=None, *, address: int | None = None, length: int | None = None) -> None:
        self.region_id = next(_region_ids)
        self.handle = handle
        if buffer is not None:
            view = memoryview(buffer)
            if view.readonly:
                raise errors.InvalidArgumentError("register() needs a writable buffer (bytearray, numpy array, mmap)")
            self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        else:
            import ctypes

            self._view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")
        self.length = self._view.nbytes
        self.address = handle.address if handle is not None else address or 0
        self.rkey = handle.packed_rkey if handle is not None else b""
        self.closed = False
        # SharedMemory when the SDK allocated this region (allocate_region).
        self.shared = None
        # Whether puts leave the checksums to the daemon: only over shared memory,
        # until a daemon answers that it cannot map it.
        self.daemon_checksums = False

    @property
    def zero_copy(self) -> bool:
        return self.handle is not None and not self.closed

    @property
    def buffer(self) -> memoryview:
        """The region's bytes (writable)."""
        if self.closed:
            raise errors.InvalidArgumentError("the memory region is closed")
        return self._view

    def wire(self) -> data_pb2.RemoteRegion:
        """The region as a zero-copy request names it."""
        region = data_pb2.RemoteRegion(region_id=self.region_id, rkey=self.rkey, address=self.address, length=self.length)
        # The memory is this process's: a daemon that hears the request from this
        # very process over its local channel copies the blocks itself.
        region.pid = os.getpid()
        if self.shared is not None:
            pid, fd, token, length = self.shared.descriptor
            region.shared_memory.pid = pid
            region.shared_memory.fd = fd
            region.shared_memory.token = token
            region.shared_memory.length = length
            region.shared_memory.address = self.address
        return region

    def view(self, offset: int, size: int) -> memoryview:
        self.check(offset, size)
        return self._view[offset : offset + size]

    def check(self, offset: int, size: int, index: int = -1) -> None:
        if self.closed:
            raise errors.InvalidArgumentError("the memory region is closed")
        if offset < 0 or size < 0 or offset + size > self.length:
            raise errors.InvalidArgumentError(
                f"entry {index}: [{offset}, {offset + size}) is outside the region of {self.length} bytes",
                index=index,
            )

    def checksum(self, offset: int, size: int) -> int:
        return checksum(self._view[offset : offset + size])

    def checksums(self, offsets, sizes, *, daemon: bool = False) -> list[int | None]:
        """The checksums a put from this region sends: None each while the daemon
        computes them itself (shared memory, see ``daemon_checksums``; or
        ``daemon``: a co-located daemon copies this process's memory itself)."""
        if self.daemon_checksums or daemon:
            return [None] * len(offsets)
        return [self.checksum(o, n) for o, n in zip(offsets, sizes)]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.handle is not None:
            self.handle.close()
        self._view.release()
        if self.shared is not None:
            self.shared.close()

    def __enter__(self) -> "MemoryRegion":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = ("shared " if self.shared is not None else "") + ("zero-copy" if self.zero_copy else "inline")
        return f"<MemoryRegion {self.region_id} {self.length} bytes {mode}{' closed' if self.closed else ''}>"


class StagingPool:
    """A registered buffer carved into extents for in-flight plain puts and gets."""

    def __init__(self, region: MemoryRegion) -> None:
        self.region = region
        # Plain puts carry the writer's checksums even over shared memory: the SDK
        # copies the values in here, and the daemon checks it got what was meant.
        region.daemon_checksums = False
        self.allocator = ExtentAllocator(region.length)
        self._freed = asyncio.Condition()

    async def acquire(self, size: int) -> int | None:
        """An offset of ``size`` bytes, waiting for room; None if it can never fit."""
        if ExtentAllocator.rounded(size) > self.allocator.capacity:
            return None
        async with self._freed:
            while True:
                offset = self.allocator.allocate(size)
                if offset is not None:
                    return offset
                await self._freed.wait()

    async def release(self, offset: int, size: int) -> None:
        async with self._freed:
            self.allocator.free(offset, size)
            self._freed.notify_all()

    def close(self) -> None:
        self.region.close()


def anonymous_buffer(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def allocate_region(nbytes: int, register, *, share: bool = True) -> MemoryRegion:
    """``nbytes`` of memory owned by the SDK, registered with ``register`` (the
    client's ``register``): with ``share``, shared memory where the platform
    has it, so that a daemon on this host can map it; else anonymous memory."""
    from kvstore._native import shared_memory

    if not isinstance(nbytes, int) or nbytes <= 0:
        raise errors.InvalidArgumentError(f"allocate() needs a positive number of bytes, not {nbytes!r}")
    shared = shared_memory.SharedMemory.create(nbytes) if share and shared_memory.supported() else None
    try:
        region = register(shared.buffer if shared is not None else anonymous_buffer(nbytes))
    except BaseException:
        if shared is not None:
            shared.close()
        raise
    region.shared = shared
    region.daemon_checksums = shared is not None
    return region


# UCX transport names that mean shared memory between processes.
_SHARED_MEMORY_TLS = {"all", "shm", "sm", "cma", "posix", "sysv", "knem", "xpmem"}


def shared_memory_allowed(ucx_tls: str | None) -> bool:
    """Whether a client configured with ``ucx_tls`` may share memory with a
    daemon: yes unless its transport list leaves shared memory out (e.g. "tcp",
    or "^shm")."""
    if not ucx_tls:
        return True
    names = [name.strip().lower() for name in ucx_tls.split(",") if name.strip()]
    if names and names[0].startswith("^"):
        excluded = {names[0][1:], *names[1:]}
        return not ({"shm", "sm"} & excluded)
    return any(name in _SHARED_MEMORY_TLS for name in names)
