"""SharedMemory: a client's sealed memfd that another process attaches to only
when it is exactly what the client described."""

from __future__ import annotations

import fcntl
import mmap
import os
import subprocess
import sys
import textwrap

import pytest

from kvstore._native.shared_memory import SharedMemory, SharedMemoryUnavailable, supported

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not supported(), reason="no memfd shared memory on this platform"),
]

# A second process attaches to the descriptor given on argv, writes, and reports.
ATTACHER = textwrap.dedent(
    """
    import sys
    from kvstore._native.shared_memory import SharedMemory, SharedMemoryUnavailable
    pid, fd, token, length = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    try:
        m = SharedMemory.attach(pid, fd, token, length)
    except SharedMemoryUnavailable as exc:
        print("refused:", exc.message)
    else:
        print("mapped", bytes(m.buffer[:5]).decode(), m.still_held())
        m.buffer[5:10] = b"world"
        m.close()
    """
)


def attach_from_another_process(pid, fd, token, length) -> str:
    out = subprocess.run(
        [sys.executable, "-c", ATTACHER, str(pid), str(fd), token, str(length)],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_another_process_maps_it_and_writes_through():
    with_memory = SharedMemory.create(1 << 20)
    try:
        with_memory.buffer[:5] = b"hello"
        assert attach_from_another_process(*with_memory.descriptor) == "mapped hello True"
        assert with_memory.buffer[:10] == b"helloworld"
        seals = fcntl.fcntl(with_memory.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    finally:
        with_memory.close()


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda pid, fd, token, length: (pid, fd, "0" * 32, length), "not the client's shared memory"),
        (lambda pid, fd, token, length: (pid, fd, token, length + 4096), "not the"),
        (lambda pid, fd, token, length: (pid, fd + 100, token, length), "cannot open"),
        (lambda pid, fd, token, length: (pid, fd, "../../etc/passwd", length), "malformed"),
        (lambda pid, fd, token, length: (2**22 + 12345, fd, token, length), "cannot open"),
    ],
    ids=["wrong-token", "wrong-length", "wrong-fd", "bad-token", "no-such-process"],
)
def test_anything_but_the_described_memory_is_refused(change, reason):
    memory = SharedMemory.create(1 << 16)
    try:
        out = attach_from_another_process(*change(*memory.descriptor))
        assert out.startswith("refused:") and reason in out, out
    finally:
        memory.close()


def test_an_unsealed_memfd_is_refused():
    # Without the shrink seal, the client could truncate it under the daemon's mapping.
    token = "ab" * 16
    fd = os.memfd_create("kvstore-" + token, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(SharedMemoryUnavailable, match="sealed"):
            SharedMemory.attach(os.getpid(), fd, token, 4096)
    finally:
        os.close(fd)


def test_another_file_at_the_fd_is_refused(tmp_path):
    path = tmp_path / ("kvstore-" + "cd" * 16)
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(SharedMemoryUnavailable, match="not the client's shared memory"):
            SharedMemory.attach(os.getpid(), fd, "cd" * 16, 4096)
    finally:
        os.close(fd)


def test_still_held_turns_false_once_the_client_closes_it():
    client = SharedMemory.create(4096)
    daemon_side = SharedMemory.attach(*client.descriptor)
    assert daemon_side.still_held()
    client.buffer[:3] = b"abc"
    assert daemon_side.buffer[:3] == b"abc"
    client.close()
    assert not daemon_side.still_held()
    assert daemon_side.buffer[:3] == b"abc"  # the mapping keeps the memory until it is closed
    daemon_side.close()
    daemon_side.close()  # idempotent


def test_closing_while_exported_defers_the_unmap():
    memory = SharedMemory.create(4096)
    view = memoryview(memory.buffer)
    memory.close()  # exported: not unmapped yet, and no error
    view[:2] = b"ok"
    assert bytes(view[:2]) == b"ok"
    view.release()
    assert memory.closed and memory.buffer is None


def test_invalid_lengths():
    from kvstore import errors

    with pytest.raises(errors.InvalidArgumentError):
        SharedMemory.create(0)
    with pytest.raises(SharedMemoryUnavailable):
        SharedMemory.attach(os.getpid(), 0, "ab" * 16, 0)


def test_the_memfd_is_not_inherited_by_children():
    memory = SharedMemory.create(4096)
    try:
        assert not os.get_inheritable(memory.fd)
        assert isinstance(memory.buffer, mmap.mmap)
    finally:
        memory.close()
