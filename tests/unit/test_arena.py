from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.server.storage.arena import ALIGNMENT, Arena, ExtentAllocator
from kvstore.server.storage.memory import MemoryTier


def test_allocate_until_full_then_reuse():
    alloc = ExtentAllocator(1024)
    a = alloc.allocate(500)
    b = alloc.allocate(500)
    assert a == 0 and b == 512
    assert alloc.allocate(64) is None
    alloc.free(a, 500)
    assert alloc.allocate(100) == 0


def test_coalescing_restores_one_extent():
    alloc = ExtentAllocator(4096)
    offsets = [alloc.allocate(256) for _ in range(16)]
    assert alloc.allocate(1) is None
    for off in offsets[::2] + offsets[1::2]:
        alloc.free(off, 256)
    assert alloc.free_extents == 1 and alloc.largest_free == 4096 and alloc.used == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=200))
def test_extents_never_overlap(ops):
    capacity = 64 * 1024
    alloc = ExtentAllocator(capacity)
    live: dict[int, int] = {}
    for do_alloc, size in ops:
        if do_alloc or not live:
            off = alloc.allocate(size)
            if off is None:
                continue
            assert off % ALIGNMENT == 0 and off + size <= capacity
            for other, other_size in live.items():
                assert off + size <= other or other + other_size <= off
            live[off] = size
        else:
            off = next(iter(live))
            alloc.free(off, live.pop(off))
    for off, size in live.items():
        alloc.free(off, size)
    assert alloc.used == 0 and alloc.largest_free == capacity


def test_arena_views_are_writable():
    arena = Arena(1 << 20)
    off = arena.allocate(5)
    arena.view(off, 5)[:] = b"hello"
    assert bytes(arena.view(off, 5)) == b"hello"
    arena.close()


def _fill(tier: MemoryTier, key: bytes, size: int, seq: int, dirty=False):
    slot = tier.reserve(size)
    if slot is None:
        return None
    return tier.publish(key, slot, size, 0, seq, dirty=dirty)


def test_lru_evicts_least_recently_used_clean_blocks():
    tier = MemoryTier(4096, max_block_fraction=1.0)
    for i in range(4):
        _fill(tier, b"k%d" % i, 1024, i)
    tier.lookup(b"k0")  # k0 is now the most recent
    _fill(tier, b"k4", 1024, 5)
    assert b"k1" not in tier and b"k0" in tier and b"k4" in tier
    assert tier.evictions == 1


def test_dirty_and_pinned_blocks_are_never_evicted():
    tier = MemoryTier(2048, max_block_fraction=1.0)
    dirty = _fill(tier, b"dirty", 1024, 1, dirty=True)
    pinned = _fill(tier, b"pinned", 1024, 2)
    tier.pin(pinned)
    assert tier.reserve(1024) is None
    tier.unpin(pinned)
    assert tier.reserve(1024) is not None  # now the clean block can go
    assert b"dirty" in tier and dirty.dirty


def test_overwrite_while_pinned_frees_on_unpin():
    tier = MemoryTier(2048, max_block_fraction=1.0)
    old = _fill(tier, b"k", 1024, 1)
    tier.pin(old)
    _fill(tier, b"k", 1024, 2)
    assert old.retired and tier.arena.allocator.used == 2048
    tier.unpin(old)
    assert tier.arena.allocator.used == 1024
    # An older sequence never replaces a newer one.
    slot = tier.reserve(64)
    assert tier.publish(b"k", slot, 64, 0, 1, dirty=False) is None
    assert tier.lookup(b"k").seq == 2


def test_prefault_reports_progress_and_keeps_bytes():
    arena = Arena(9 << 20)  # not a multiple of the prefault chunk: the last call is short
    try:
        arena.view(0, 5)[:] = b"hello"  # a block written while the prefault runs keeps its bytes
        assert arena.resident_bytes == 0
        arena.prefault()
        arena._prefaulter.join(timeout=30)
        assert arena.resident_bytes == arena.capacity
        assert bytes(arena.view(0, 5)) == b"hello"
    finally:
        arena.close()
