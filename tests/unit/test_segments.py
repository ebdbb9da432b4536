import os

from kvstore.server.storage.segments import HEADER_SIZE, SegmentLog


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_records_roll_over_and_read_back(tmp_path):
    log = SegmentLog(tmp_path, segment_size=1 << 20)
    placed = []
    for i in range(40):
        value = bytes([i]) * 100_000
        placed.append((log.append(b"key%d" % i, value, len(value), i, i), value, b"key%d" % i))
    segments = {seg for (seg, _), _, _ in placed}
    assert len(segments) >= 4
    for (seg, offset), value, key in placed:
        assert bytes(log.read(seg, offset, len(value))) == value
        checksum, seq, got = log.read_record(seg, offset, key, len(value))
        assert bytes(got) == value and checksum == seq
        assert log.read_record(seg, offset, b"other-key", len(value)) is None
    log.sync()
    log.close()


def test_rolled_segments_do_not_keep_write_descriptors(tmp_path):
    log = SegmentLog(tmp_path, segment_size=1 << 20)
    log.append(b"k", b"x", 1, 0, 0)
    before = open_fds()
    for i in range(50):
        log.append(b"k%d" % i, b"v" * 600_000, 600_000, 0, i)
    log.sync()
    assert open_fds() <= before + 1
    log.close()


def test_a_new_process_starts_a_new_segment(tmp_path):
    first = SegmentLog(tmp_path, segment_size=1 << 20)
    seg, offset = first.append(b"k", b"abc", 3, 0, 1)
    first.close()
    second = SegmentLog(tmp_path, segment_size=1 << 20)
    seg2, offset2 = second.append(b"k", b"def", 3, 0, 2)
    assert seg2 == seg + 1 and offset2 == HEADER_SIZE + 1
    assert bytes(second.read(seg, offset, 3)) == b"abc"
    second.close()
