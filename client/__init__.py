"""The kvstore SDK.

    from kvstore.client import Client, SyncClient
    async with Client("127.0.0.1:7600", tenant="default", subtenant="default") as kv:
        await kv.put(b"key", b"value")
        assert await kv.get(b"key") == b"value"

Errors are ``kvstore.errors.KVStoreError`` subclasses; a miss is ``None``.
"""

from kvstore.client.api import Client
from kvstore.client.config import ClientConfig, Deadline, RetryPolicy
from kvstore.client.regions import MemoryRegion
from kvstore.client.sync import SyncClient
from kvstore.errors import (
    DataCorruptionError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    KVStoreError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryableError,
    UnavailableError,
)

__all__ = [
    "Client",
    "ClientConfig",
    "DataCorruptionError",
    "Deadline",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "KVStoreError",
    "MemoryRegion",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RetryableError",
    "SyncClient",
    "UnavailableError",
]
