"""The memory tier's arena: one fixed-capacity anonymous mapping, carved into
extents by a best-fit allocator (kvstore.extents).

The arena is a single contiguous buffer so that the data plane can register it
with UCX once (``Arena.buffer`` is a writable buffer-protocol object) and hand
out (offset, length) descriptors into it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading

from kvstore.extents import ALIGNMENT, ExtentAllocator

__all__ = ["ALIGNMENT", "Arena", "ExtentAllocator"]

log = logging.getLogger("kvstore.server.arena")

MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable without touching their bytes
# Each madvise call holds the process's mmap lock for its duration, and every
# mmap, munmap (gRPC buffers, UCX endpoints, clients' shared memory) and page
# fault of the daemon waits behind it: one huge page per call keeps each wait to
# about a millisecond where the host hands pages out slowly (64 MiB calls made a
# client's Hello take seconds on a fresh VM).
PREFAULT_CHUNK = 2 << 20


class Arena:
    """A fixed-capacity anonymous mapping and its allocator."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            # Huge pages where the kernel allows them: the copies in and out of
            # the arena stream through it (~5% faster here), and it is all
            # faulted in anyway (prefault).
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        self.buffer = memoryview(self._map)
        self.allocator = ExtentAllocator(capacity)
        self._prefault_stop = threading.Event()
        self._prefaulter: threading.Thread | None = None
        self.resident_bytes = 0  # prefaulted so far (the whole arena once prefault is done)

    def prefault(self) -> None:
        """Fault the arena's pages in on a background thread.

        A first write to a fresh page costs several times the copy itself (2.6
        against 20 GB/s here), and the daemon must start serving at once, so the
        pages are made resident behind its back. MADV_POPULATE_WRITE leaves the
        bytes alone, so blocks already being written into the arena are safe.
        """
        anchor = ctypes.c_char.from_buffer(self._map)
        address = ctypes.addressof(anchor)
        del anchor  # release the buffer export, or the mapping could never be closed
        self._prefaulter = threading.Thread(
            target=self._prefault, args=(address,), name="kvstore-arena-prefault", daemon=True
        )
        self._prefaulter.start()

    def _prefault(self, address: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        for offset in range(0, self.capacity, PREFAULT_CHUNK):
            if self._prefault_stop.is_set():
                return
            length = min(PREFAULT_CHUNK, self.capacity - offset)
            if libc.madvise(ctypes.c_void_p(address + offset), ctypes.c_size_t(length), MADV_POPULATE_WRITE) != 0:
                log.debug("arena prefault unsupported here (errno %d); pages fault in on first use", ctypes.get_errno())
                self.resident_bytes = self.capacity  # nothing more will happen: report it done
                return
            self.resident_bytes = offset + length

    def allocate(self, nbytes: int) -> int | None:
        return self.allocator.allocate(nbytes)

    def free(self, offset: int, nbytes: int) -> None:
        self.allocator.free(offset, nbytes)

    def view(self, offset: int, nbytes: int) -> memoryview:
        return self.buffer[offset : offset + nbytes]

    def close(self) -> None:
        self._prefault_stop.set()
        if self._prefaulter is not None:
            self._prefaulter.join()
        self.buffer.release()
        self._map.close()
