"""``SyncClient``: the blocking facade of ``Client`` for engine worker threads.

One background thread runs an event loop that owns the async client; every
method submits a coroutine to it and waits, so any number of threads may share
one SyncClient.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Sequence

from kvstore.client.api import Client
from kvstore.protocol.codes import ErrorCode


class SyncClient:
    def __init__(self, endpoints: str | Sequence[str] | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore-client", daemon=True)
        self._thread.start()
        self._client = self._run(self._make(endpoints, kwargs))
        self.config = self._client.config

    async def _make(self, endpoints, kwargs) -> Client:
        return Client(endpoints, **kwargs)

    def _run(self, coro):
        if self._loop.is_closed():
            coro.close()
            from kvstore.errors import UnavailableError

            raise UnavailableError("the client is closed", code=ErrorCode.SHUTTING_DOWN)
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> "SyncClient":
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def connect(self) -> None:
        self._run(self._client.connect())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # ``options`` of the data calls: deadline= (a Deadline or seconds), retry= (a RetryPolicy).

    def put(self, key: bytes, value, durability: str | None = None, **options) -> None:
        return self._run(self._client.put(key, value, durability, **options))

    def put_many(self, items, durability: str | None = None, **options) -> int:
        return self._run(self._client.put_many(items, durability, **options))

    def register(self, buffer):
        """A reusable MemoryRegion over a writable buffer; see Client.register."""
        return self._client.register(buffer)

    def register_ptr(self, address: int, length: int):
        return self._client.register_ptr(address, length)

    def allocate(self, nbytes: int):
        """SDK-owned memory a co-located daemon maps (one memcpy per block); see Client.allocate."""
        return self._client.allocate(nbytes)

    def put_from(self, keys, region, offsets, sizes, durability: str | None = None, **options) -> int:
        return self._run(self._client.put_from(keys, region, offsets, sizes, durability, **options))

    def get_into(self, keys, region, offsets, capacities, **options) -> list[int | None]:
        return self._run(self._client.get_into(keys, region, offsets, capacities, **options))

    @property
    def zero_copy(self) -> bool:
        return self._client.zero_copy

    def get(self, key: bytes, **options) -> bytes | None:
        return self._run(self._client.get(key, **options))

    def get_many(self, keys: Sequence[bytes], **options) -> list[bytes | None]:
        return self._run(self._client.get_many(keys, **options))

    def exists(self, keys: Sequence[bytes], **options) -> list[bool]:
        return self._run(self._client.exists(keys, **options))

    def lookup_prefix(self, keys: Sequence[bytes], **options) -> int:
        return self._run(self._client.lookup_prefix(keys, **options))

    def delete(self, keys: Sequence[bytes]) -> int:
        return self._run(self._client.delete(keys))

    def list(self, prefix: bytes = b"", *, limit: int | None = None) -> list[tuple[bytes, int]]:
        return self._run(self._client.list(prefix, limit=limit))

    def stat(self) -> dict:
        return self._run(self._client.stat())

    def server_stats(self) -> dict:
        return self._run(self._client.server_stats())

    def namespaces(self, tenant: str = "") -> list[dict]:
        return self._run(self._client.namespaces(tenant))

    def drop_namespace(self, tenant: str | None = None, subtenant: str | None = None) -> dict:
        return self._run(self._client.drop_namespace(tenant, subtenant))

    def create_namespace(self, tenant: str | None = None, subtenant: str | None = None) -> bool:
        return self._run(self._client.create_namespace(tenant, subtenant))

    def create_token(self, tenant: str, subtenant: str = "", *, read_only: bool = False, description: str = "") -> dict:
        return self._run(self._client.create_token(tenant, subtenant, read_only=read_only, description=description))

    def tokens(self, tenant: str = "") -> list[dict]:
        return self._run(self._client.tokens(tenant))

    def revoke_token(self, token_id: str) -> None:
        return self._run(self._client.revoke_token(token_id))

    def cluster_map(self) -> dict:
        self.connect()
        return self._client.cluster_map()

    def refresh_map(self) -> dict:
        return self._run(self._client.refresh_map())

    def cluster_stats(self) -> list[dict]:
        return self._run(self._client.cluster_stats())

    def set_replication(self, replicas: int, write_quorum: int = 0) -> dict:
        return self._run(self._client.set_replication(replicas, write_quorum))

    def set_rate_limit(self, requests_per_second: float, burst: int = 0) -> dict:
        return self._run(self._client.set_rate_limit(requests_per_second, burst))

    def replication(self) -> dict:
        return self._run(self._client.replication())
