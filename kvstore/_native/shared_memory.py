"""Client memory a co-located daemon maps: the shared-memory fast path.

The client creates the memory (``SharedMemory.create``): an anonymous memfd
named ``kvstore-<token>``, sealed against shrinking (so a mapping of it can
never fault on a truncated page), mapped and prefaulted in the client. It
keeps the fd open and describes the memory to the daemon as (pid, fd, token,
length). The daemon (``SharedMemory.attach``) opens ``/proc/<pid>/fd/<fd>``,
which works only on the same host, in the same pid namespace and with the
right to read that process's fds, checks that it is that memfd (name with the
token, size, seals) and maps it. From then on the daemon moves a block with
one memcpy between that mapping and its arena (``copy_blocks``), hashing it on
the way.

Only the client's memory is shared. The daemon's arena is never mapped into a
client, so a client can reach no byte of the daemon but its own.

A daemon mapping keeps the memory alive after the client closes the region or
dies; the daemon drops it when the client's process exits (``pidfd``) or when
``still_held()`` says the client closed that fd.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets
import stat

from kvstore import errors
from kvstore.protocol.codes import ErrorCode

__all__ = ["NAME_PREFIX", "SharedMemory", "SharedMemoryUnavailable", "supported"]

NAME_PREFIX = "kvstore-"
_TOKEN = re.compile(r"[0-9a-f]{32}")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL if hasattr(fcntl, "F_SEAL_SHRINK") else 0
MADV_POPULATE_WRITE = 23  # Linux 5.14+


class SharedMemoryUnavailable(errors.UnavailableError):
    """The daemon cannot map this client's memory (another host, another pid
    namespace, no permission, or not the memory the client described)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=ErrorCode.SHARED_MEMORY_UNAVAILABLE)


def supported() -> bool:
    """Whether this platform has what the fast path needs (Linux memfd with seals)."""
    return hasattr(os, "memfd_create") and _SEALS != 0 and os.path.isdir("/proc/self/fd")


class SharedMemory:
    """One shared range: ``buffer`` (a writable mmap) in whichever process holds it."""

    def __init__(self, buffer: mmap.mmap, pid: int, fd: int, token: str, *, owner: bool, identity=None) -> None:
        self.buffer = buffer
        self.pid = pid
        self.fd = fd  # the client's fd number (owned by this object in the client only)
        self.token = token
        self.length = len(buffer)
        self.address = 0  # daemon side: where the client mapped it (its descriptors' base)
        self._owner = owner
        self._identity = identity  # (st_dev, st_ino) of the memfd, daemon side
        self.closed = False

    # -- client side -------------------------------------------------------

    @classmethod
    def create(cls, length: int) -> "SharedMemory":
        """A new sealed memfd of ``length`` bytes, mapped and prefaulted here."""
        if not supported():
            raise SharedMemoryUnavailable("shared memory needs Linux memfd_create with seals")
        if not isinstance(length, int) or length <= 0:
            raise errors.InvalidArgumentError(f"a shared region needs a positive length, not {length!r}")
        token = secrets.token_hex(16)
        fd = os.memfd_create(NAME_PREFIX + token, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, length)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            buffer = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        try:
            buffer.madvise(MADV_POPULATE_WRITE)  # first touches cost more than the copies
        except OSError:
            pass  # older kernel: pages fault in on first use
        return cls(buffer, os.getpid(), fd, token, owner=True)

    @property
    def descriptor(self) -> tuple[int, int, str, int]:
        """(pid, fd, token, length): what the daemon needs to attach."""
        return self.pid, self.fd, self.token, self.length

    # -- daemon side -------------------------------------------------------

    @classmethod
    def attach(cls, pid: int, fd: int, token: str, length: int) -> "SharedMemory":
        """Map a client's memory; SharedMemoryUnavailable unless it is exactly what
        the client described and this process may map it."""
        if not supported():
            raise SharedMemoryUnavailable("this daemon's platform has no memfd shared memory")
        if not (isinstance(token, str) and _TOKEN.fullmatch(token)):
            raise SharedMemoryUnavailable("malformed shared-memory token")
        if pid <= 0 or fd < 0 or length <= 0:
            raise SharedMemoryUnavailable(f"invalid shared-memory descriptor (pid {pid}, fd {fd}, length {length})")
        expected = f"/memfd:{NAME_PREFIX}{token} (deleted)"
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path) != expected:
                raise SharedMemoryUnavailable(f"{path} is not the client's shared memory")
            own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedMemoryUnavailable(f"cannot open the client's shared memory {path}: {exc.strerror}") from None
        try:
            # The fd may have been swapped between readlink and open: check what we opened.
            if os.readlink(f"/proc/self/fd/{own}") != expected:
                raise SharedMemoryUnavailable(f"{path} changed while it was opened")
            st = os.fstat(own)
            if not stat.S_ISREG(st.st_mode) or st.st_size != length:
                raise SharedMemoryUnavailable(
                    f"the client's shared memory has {st.st_size} bytes, not the {length} it described"
                )
            if fcntl.fcntl(own, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK == 0:
                raise SharedMemoryUnavailable("the client's shared memory is not sealed against shrinking")
            # No MAP_POPULATE: it would allocate every page of a sparse memfd the client never
            # touched (a 2 GiB one cost the host 2 GiB); pages fault in as copies reach them.
            buffer = mmap.mmap(own, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise SharedMemoryUnavailable(f"cannot map the client's shared memory: {exc}") from None
        finally:
            os.close(own)  # the mapping keeps the memory
        return cls(buffer, pid, fd, token, owner=False, identity=(st.st_dev, st.st_ino))

    def still_held(self) -> bool:
        """Daemon side: whether the client still holds this memory at its fd."""
        try:
            st = os.stat(f"/proc/{self.pid}/fd/{self.fd}")
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    # -- both --------------------------------------------------------------

    def close(self) -> None:
        """Unmap (and, in the client, close the fd). A copy in flight keeps the
        mapping until it ends: the mapping is then released with its last user."""
        if self.closed:
            return
        self.closed = True
        buffer, self.buffer = self.buffer, None
        try:
            buffer.close()
        except BufferError:
            pass  # exported to a copy in flight (or a view): unmapped when the last one goes
        if self._owner:
            os.close(self.fd)

    def __repr__(self) -> str:
        side = "client" if self._owner else f"client pid {self.pid}"
        return f"SharedMemory({self.length} bytes, {side}{', closed' if self.closed else ''})"
