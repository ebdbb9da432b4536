"""Throughput benchmarks of kvstore.

``python -m bench`` measures put and get GB/s and latency of kvstore against one
local daemon (zero-copy over shared memory, zero-copy over TCP only, inline),
from 1 and 4 client processes, next to the machine's memcpy and loopback TCP
limits and to peer stores (Redis, Mooncake Store, LMCache; bench.peers), all in
the same run; it writes a markdown table with ratios and targets, the raw
numbers as JSON and a PNG plot (bench/results/latest.*). ``python -m bench
storage`` compares on-disk layouts for block values.

Modules: suite (the cases and their order), workers (client processes and the
kvstore/peer drivers), limits (memcpy, TCP), kvstore_runner (the daemon),
peers/ (Redis, Mooncake, LMCache), report (tables, targets), plot (PNG).
"""
