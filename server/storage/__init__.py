"""Storage tiers of the daemon.

``BlockStore`` (store.py) is what the RPC layer calls. It keeps hot blocks in
the memory tier (memory.py: an index and LRU over one arena, arena.py) and every
persisted block in the disk tier (disk.py: values appended to segment files,
segments.py, indexed by RocksDB). Zero-copy puts and gets move their bytes
through a ``Transfer`` (transfer.py) that the data plane implements and hands
in per request; callers outside this package see only BlockStore's methods.
"""
