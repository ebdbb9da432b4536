"""Client.allocate: regions a co-located daemon maps (shared memory), used by
put_from / get_into across processes, with the RMA fallback when the daemon
cannot map them."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvstore.client import Client

try:
    from kvstore import _native
    from kvstore._native.shared_memory import supported

    SHARED = _native.available() and supported()
except ImportError:
    SHARED = False

pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(not SHARED, reason="no native data plane or memfd")]


def mapped_tokens(pid: int) -> set[str]:
    """Tokens of the client memfds process ``pid`` has mapped."""
    tokens = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            if "/memfd:kvstore-" in line:
                tokens.add(line.split("/memfd:kvstore-", 1)[1].split()[0])
    return tokens


@pytest.fixture(scope="module")
def daemon_pid_address(tmp_path_factory):
    """One daemon in its own process: the client's memory is shared across processes."""
    from tests.conftest import DaemonProcess

    proc = DaemonProcess(tmp_path_factory.mktemp("shared"), "--memory", "512MiB", "--max-value-size", "96MiB").start()
    yield proc.proc.pid, proc.address
    proc.stop()


def fill(region, seed: int) -> np.ndarray:
    view = np.frombuffer(region.buffer, dtype=np.uint8)
    view[:] = np.random.default_rng(seed).integers(0, 256, len(view), dtype=np.uint8)
    return view


async def test_blocks_of_1_byte_to_64_mib_are_byte_exact(daemon_pid_address, tenant):
    pid, address = daemon_pid_address
    sizes = [1, 17, 4095, 4096, 4097, (1 << 20) - 1, 1 << 20, 3_333_333, 64 << 20]
    async with Client(address, tenant=tenant, transport="ucx") as kv:
        with kv.allocate(sum(sizes) + 4096) as src, kv.allocate(sum(sizes) + 4096) as dst:
            data = fill(src, 1)
            offsets = np.cumsum([5] + sizes[:-1]).tolist()  # unaligned offsets
            keys = [b"s%d" % n for n in sizes]
            assert await kv.put_from(keys, src, offsets, sizes) == len(sizes)
            assert src.shared.token in mapped_tokens(pid)  # the daemon copied from our memory
            got = await kv.get_into(keys + [b"missing"], dst, offsets + [0], sizes + [10])
            assert got == sizes + [None]
            assert dst.shared.token in mapped_tokens(pid)
            out = np.frombuffer(dst.buffer, dtype=np.uint8)
            for offset, size in zip(offsets, sizes):
                assert np.array_equal(out[offset : offset + size], data[offset : offset + size]), size
            del data, out
            # The plain API reads the same blocks (through the shared staging pool).
            assert await kv.get(b"s4097") == bytes(src.buffer[offsets[4] : offsets[4] + 4097])


async def test_batches_of_a_thousand_keys(daemon_pid_address, tenant):
    _, address = daemon_pid_address
    n, size = 1000, 4096
    async with Client(address, tenant=tenant, transport="ucx", max_batch_keys=256) as kv:
        with kv.allocate(n * size) as src, kv.allocate(n * size) as dst:
            data = fill(src, 2)
            keys = [b"k%04d" % i for i in range(n)]
            offsets = [i * size for i in range(n)]
            assert await kv.put_from(keys, src, offsets, [size] * n) == n
            assert await kv.get_into(keys, dst, offsets[::-1], [size] * n) == [size] * n
            out = np.frombuffer(dst.buffer, dtype=np.uint8).reshape(n, size)
            assert np.array_equal(out[::-1], data.reshape(n, size))
            del data, out


async def test_plain_put_many_and_get_many_go_through_shared_staging(daemon_pid_address, tenant):
    pid, address = daemon_pid_address
    values = [(b"p%d" % i, os.urandom(s)) for i, s in enumerate([1, 100, 70_000, 3 << 20, 200_000])]
    async with Client(address, tenant=tenant, transport="ucx") as kv:
        await kv.put_many(values)
        assert await kv.get_many([k for k, _ in values] + [b"none"]) == [v for _, v in values] + [None]
        assert kv._nodes.staging.region.shared.token in mapped_tokens(pid)


async def test_a_daemon_that_cannot_map_the_memory_copies_it_from_the_process(daemon_pid_address, tenant):
    _, address = daemon_pid_address
    async with Client(address, tenant=tenant, transport="ucx") as kv:
        with kv.allocate(1 << 20) as src, kv.allocate(1 << 20) as dst:
            data = fill(src, 3)
            src.shared.pid = dst.shared.pid = 2**22 + 4321  # a process the daemon cannot find
            assert await kv.put_from([b"a", b"b"], src, [0, 1000], [1000, 5000]) == 2
            assert src.daemon_checksums  # our own process's memory: the daemon still hashed it
            assert await kv.get_into([b"b", b"a"], dst, [0, 8192], [5000, 1000]) == [5000, 1000]
            out = np.frombuffer(dst.buffer, dtype=np.uint8)
            assert np.array_equal(out[:5000], data[1000:6000]) and np.array_equal(out[8192:9192], data[:1000])
            del data, out


async def test_a_daemon_that_can_neither_map_nor_copy_the_memory_reads_it_by_rma(daemon_pid_address, tenant, monkeypatch):
    from kvstore.client.regions import MemoryRegion

    wire = MemoryRegion.wire

    def elsewhere(region):
        message = wire(region)
        message.pid = 2**22 + 4321  # not the process at the other end of the local channel
        return message

    _, address = daemon_pid_address
    monkeypatch.setattr(MemoryRegion, "wire", elsewhere)
    async with Client(address, tenant=tenant, transport="ucx") as kv:
        with kv.allocate(1 << 20) as src, kv.allocate(1 << 20) as dst:
            data = fill(src, 3)
            src.shared.pid = dst.shared.pid = 2**22 + 4321  # a process the daemon cannot find
            assert src.daemon_checksums
            assert await kv.put_from([b"a", b"b"], src, [0, 1000], [1000, 5000]) == 2
            assert not src.daemon_checksums  # refused once, then sent with checksums over RMA
            assert await kv.get_into([b"b", b"a"], dst, [0, 8192], [5000, 1000]) == [5000, 1000]
            out = np.frombuffer(dst.buffer, dtype=np.uint8)
            assert np.array_equal(out[:5000], data[1000:6000]) and np.array_equal(out[8192:9192], data[:1000])
            del data, out


async def test_closed_regions_are_unmapped_by_the_daemon(daemon_pid_address, tenant):
    pid, address = daemon_pid_address
    async with Client(address, tenant=tenant, transport="ucx") as kv:
        old = kv.allocate(1 << 20)
        await kv.put_from([b"x"], old, [0], [100])
        token = old.shared.token
        assert token in mapped_tokens(pid)
        old.close()
        with kv.allocate(1 << 20) as new:  # mapping a new region sweeps the closed ones
            await kv.put_from([b"y"], new, [0], [100])
            assert token not in mapped_tokens(pid)
            assert new.shared.token in mapped_tokens(pid)


async def test_regions_of_a_client_that_closes_are_unmapped(daemon_pid_address, tenant):
    import subprocess
    import sys
    import time

    pid, address = daemon_pid_address
    script = (
        "import asyncio, sys\n"
        "from kvstore.client import Client\n"
        "async def main():\n"
        "    async with Client(sys.argv[1], tenant=sys.argv[2], transport='ucx') as kv:\n"
        "        r = kv.allocate(1 << 20)\n"
        "        await kv.put_from([b'z'], r, [0], [10])\n"
        "        print(r.shared.token, flush=True)\n"
        "asyncio.run(main())\n"
    )
    token = subprocess.run([sys.executable, "-c", script, address, tenant], capture_output=True, text=True, timeout=60).stdout.strip()
    assert len(token) == 32
    deadline = time.monotonic() + 10
    while token in mapped_tokens(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert token not in mapped_tokens(pid)


async def test_allocate_without_the_data_plane_works_inline(daemon, tenant):
    async with Client(daemon.address, tenant=tenant, transport="inline") as kv:
        with kv.allocate(64 << 10) as region:
            assert not region.zero_copy
            region.buffer[:5] = b"hello"
            await kv.put_from([b"h"], region, [0], [5])
            assert await kv.get_into([b"h"], region, [100], [10]) == [5]
            assert bytes(region.buffer[100:105]) == b"hello"


async def test_a_corrupt_arena_block_is_never_returned(fresh_daemon, tenant):
    # In-process daemon: the test can damage the arena copy of a block.
    async with Client(fresh_daemon.address, tenant=tenant, transport="ucx") as kv:
        with kv.allocate(1 << 20) as region:
            data = fill(region, 4).copy()
            await kv.put_from([b"c"], region, [0], [1 << 20], durability="disk")
            entry = next(e for k, e in fresh_daemon.store.memory._index.items() if k.endswith(b"c"))
            fresh_daemon.store.memory.arena.buffer[entry.offset + 7] ^= 0xFF
            corrupt_before = fresh_daemon.store.disk.corrupt_blocks
            assert await kv.get_into([b"c"], region, [0], [1 << 20]) == [None]  # a miss, never bad bytes
            assert fresh_daemon.store.disk.corrupt_blocks == corrupt_before + 1
            # The arena copy is dropped; the next read comes from disk, intact.
            assert await kv.get_into([b"c"], region, [0], [1 << 20]) == [1 << 20]
            assert bytes(region.buffer) == data.tobytes()


async def test_a_client_restricted_to_tcp_shares_nothing(daemon_pid_address, tenant):
    pid, address = daemon_pid_address
    async with Client(address, tenant=tenant, transport="ucx", ucx_tls="tcp") as kv:
        with kv.allocate(1 << 20) as region:
            assert region.shared is None and region.zero_copy  # registered memory, read by RMA over TCP
            region.buffer[:4] = b"tcp!"
            await kv.put_from([b"t"], region, [0], [4])
            assert await kv.get_into([b"t"], region, [10], [4]) == [4]
            assert bytes(region.buffer[10:14]) == b"tcp!"
        assert kv._nodes.staging.region.shared is None


def test_which_transport_lists_allow_shared_memory():
    from kvstore.client.regions import shared_memory_allowed

    for tls in (None, "", "all", "shm,tcp", "cma,tcp", "^tcp"):
        assert shared_memory_allowed(tls), tls
    for tls in ("tcp", "TCP", "rc,tcp", "^shm", "^sm,tcp"):
        assert not shared_memory_allowed(tls), tls


async def test_concurrent_first_uses_map_a_region_once(daemon_pid_address, tenant):
    import asyncio

    pid, address = daemon_pid_address
    async with Client(address, tenant=tenant, transport="ucx") as kv:
        with kv.allocate(8 << 20) as region:
            data = fill(region, 5)
            await asyncio.gather(
                *(kv.put_from([b"c%d" % i], region, [i << 20], [1 << 20]) for i in range(8))
            )
            with open(f"/proc/{pid}/maps") as maps:
                assert sum(region.shared.token in line for line in maps) == 1
            got = await asyncio.gather(*(kv.get([b"c%d" % i][0]) for i in range(8)))
            assert got == [data[i << 20 : (i + 1) << 20].tobytes() for i in range(8)]
            del data


@pytest.mark.parametrize("past_end", [4096, (1 << 64) - 1, (1 << 63) + 5, -1])
async def test_addresses_outside_the_shared_memory_are_invalid_arguments_naming_their_entry(daemon_pid_address, tenant, past_end):
    """Just past the mapping, far past it (an offset that overflows int64), or
    before it: a precise INVALID_ARGUMENT naming the request's entry (not the
    block's place among those the daemon copied: a get copies only the blocks it
    found), never INTERNAL; and the daemon serves on."""
    from kvstore import errors
    from kvstore._proto.v1 import data_pb2

    _, daemon_address = daemon_pid_address
    async with Client(daemon_address, tenant=tenant, transport="ucx") as kv:
        with kv.allocate(1 << 20) as region:
            region.buffer[:4] = b"data"
            await kv.put_from([b"here"], region, [0], [4])
            (node,) = kv._maps.view.nodes
            address = region.address - 8 if past_end < 0 else min((1 << 64) - 1, region.address + region.length + past_end)
            get = data_pb2.GetRequest(
                namespace=kv.namespace,
                keys=[b"absent", b"here"],
                region=region.wire(),
                slots=[data_pb2.RemoteSlot(address=region.address, capacity=16), data_pb2.RemoteSlot(address=address, capacity=16)],
            )
            put = data_pb2.PutRequest(
                namespace=kv.namespace,
                region=region.wire(),
                blocks=[
                    data_pb2.BlockWrite(key=b"a", length=4, remote_address=region.address),
                    data_pb2.BlockWrite(key=b"b", length=4, remote_address=address),
                ],
            )
            put.region.shared_memory.checksums_omitted = True
            for method, request in (("Get", get), ("Put", put)):
                with pytest.raises(errors.InvalidArgumentError) as info:
                    await kv._maps.call(node, "data", method, request, 5)
                assert info.value.index == 1 and "outside the client's shared memory" in info.value.message
            assert await kv.exists([b"a", b"b"]) == [False, False]
            assert await kv.get_into([b"here"], region, [64], [16]) == [4]


ATTACKER = r'''
import asyncio, json, sys
from kvstore import errors
from kvstore._proto.v1 import data_pb2
from kvstore.client import Client

async def main():
    victim = json.loads(sys.argv[2])
    out = {}
    async with Client(sys.argv[1], tenant=victim["tenant"], subtenant="attacker", transport="ucx") as kv:
        with kv.allocate(1 << 20) as own:
            await kv.put_from([b"mine"], own, [0], [4])  # a session, and the local channel, of its own
            out["local"] = next(iter(kv._nodes.connections.values())).local is not None
            (node,) = kv._maps.view.nodes
            region = own.wire()
            for name in ("pid", "fd", "token", "length", "address"):
                setattr(region.shared_memory, name, victim[name])  # the victim's memfd, read from /proc
            put = data_pb2.PutRequest(
                namespace=kv.namespace, region=region,
                blocks=[data_pb2.BlockWrite(key=b"stolen", length=64, remote_address=victim["address"])],
            )
            put.region.shared_memory.checksums_omitted = True
            get = data_pb2.GetRequest(
                namespace=kv.namespace, keys=[b"mine"], region=region,
                slots=[data_pb2.RemoteSlot(address=victim["address"], capacity=64)],
            )
            for method, request in (("Put", put), ("Get", get)):
                try:
                    response = await kv._maps.call(node, "data", method, request, 10)
                    out[method] = "ok shared" if getattr(response, "shared_memory", False) else "ok"
                except errors.KVStoreError as exc:
                    out[method] = exc.code
            out["stolen"] = await kv.get(b"stolen")
    print(json.dumps({k: (v.hex() if isinstance(v, bytes) else v) for k, v in out.items()}))

asyncio.run(main())
'''


async def test_another_process_cannot_name_a_clients_shared_memory(daemon_pid_address, tenant):
    """A same-user process that read a client's memfd (pid, fd, token) from /proc
    names it in a request of its own session: the daemon maps memory only for
    the process on the other end of the request's own socket."""
    import json
    import subprocess
    import sys

    pid, address = daemon_pid_address
    secret = bytes(range(64))
    async with Client(address, tenant=tenant, transport="ucx") as victim:
        with victim.allocate(1 << 20) as region:
            region.buffer[:64] = secret
            pid_, fd, token, length = region.shared.descriptor
            described = {"tenant": tenant, "pid": pid_, "fd": fd, "token": token, "length": length, "address": region.address}
            attacker = subprocess.run(
                [sys.executable, "-c", ATTACKER, address, json.dumps(described)], capture_output=True, text=True, timeout=120
            )
            assert attacker.returncode == 0, attacker.stderr[-2000:]
            out = json.loads(attacker.stdout.strip().splitlines()[-1])
            assert out["local"]  # the attack came over the attacker's own local channel
            # Not mapped for it: refused, or read from the attacker's own process only (and
            # the victim's address is outside the attacker's region).
            assert out["Put"] in ("SHARED_MEMORY_UNAVAILABLE", "INVALID_ARGUMENT")
            assert out["Get"] in ("ok", "INVALID_ARGUMENT") and out["Get"] != "ok shared"
            assert out["stolen"] is None
            assert token not in mapped_tokens(pid)  # the daemon never mapped the victim's memory
            assert bytes(region.buffer[:64]) == secret
            # The victim itself still gets the fast path.
            await victim.put_from([b"v"], region, [0], [64])
            assert token in mapped_tokens(pid)
