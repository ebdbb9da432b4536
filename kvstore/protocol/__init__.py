"""The kvstore protocol beyond protobuf: what the daemon and the SDK must agree
on besides the messages of ``protos/kvstore/v1``. Both sides import it; neither
owns it.

- ``codes``: the ``ErrorCode`` names of ``errors.proto`` as constants.
- ``metadata``: gRPC metadata keys and channel options.
- ``status``: the one table between the error tree and gRPC statuses, used in
  both directions (a daemon's error leaves as status + ``ErrorDetail``; a
  client turns them back into the same error).
- ``local_channel``: the framing of Data calls over a daemon's Unix socket.
- ``convert``: durability, namespaces and replication to and from protobuf.

Importing this package imports none of its modules (``codes`` is imported by
``kvstore.errors`` itself).
"""
