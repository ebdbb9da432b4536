"""The kvstore daemon: gRPC services over a memory tier and a RocksDB-indexed disk tier."""
