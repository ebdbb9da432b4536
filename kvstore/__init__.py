"""kvstore: a distributed object store for LLM KV-cache blocks.

The shared core lives here (errors, namespaces and keys, checksums, config
helpers, the wire contract); the daemon is ``kvstore.server`` and the SDK is
``kvstore.client``.
"""

from kvstore._version import __version__

__all__ = ["__version__"]
