"""Storage tiers of the daemon.

``BlockStore`` (store.py) is what the RPC layer calls. It keeps hot blocks in
the memory tier (memory.py: an index and LRU over one arena, arena.py) and every
persisted block in the disk tier (disk.py: values appended to segment files,
segments.py, indexed by RocksDB).
"""
