"""The process harness: real kvstore daemons (and etcd) as subprocesses on
loopback, for ``kvstore cluster up|status|down``, the tests and the bench.

- ``ports``: free TCP ports on loopback.
- ``process``: one server subprocess (its output, its pid told apart from a
  reused one, SIGTERM then SIGKILL), and waiting for several to be ready.
- ``health``: readiness and status probes: the standard gRPC health service
  (``grpc.health.v1``), etcd's /health, a TCP port that accepts.
- ``daemon``: ``DaemonProcess``, one ``kvstore-server``.
- ``etcd``: ``EtcdProcess``, one single-member etcd.
- ``cluster``: ``LocalCluster``, N daemons (and optionally etcd) under one
  folder, and the ``up``/``down``/``status`` behind the CLI.

The daemon is only ever a subprocess reached over gRPC: nothing here imports
``kvstore.server`` or ``kvstore.client``. Importing this package imports none
of its modules.
"""
