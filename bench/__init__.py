"""Throughput benchmarks of kvstore.

``python -m bench`` measures put and get through the SDK against one local
daemon, next to the machine's memcpy and loopback TCP limits measured in the
same run; ``python -m bench storage`` compares on-disk layouts for block values.
"""
