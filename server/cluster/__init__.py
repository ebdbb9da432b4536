"""Cluster layer of the daemon: who the members are (``membership``, static or
``etcd``), where keys belong (``state``: the map and its ring) and moving
blocks when that changes (``rebalance``)."""
