"""``LoopThread``: one asyncio event loop on a thread of its own, for engines
that call a connector synchronously from their own threads.

The SDK is asyncio; an engine's storage threads are not. Every call submits a
coroutine to the loop and waits for it up to a deadline; a call still running
then is cancelled and raises ``DeadlineExceededError``, so no engine thread
waits forever on a daemon that stopped answering. Any number of threads may
share one loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Awaitable, Callable, TypeVar

from kvstore import errors
from kvstore.protocol.codes import ErrorCode

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: float) -> T:
        """The result of ``coro`` run on the loop, waited for at most ``timeout`` seconds."""
        if self.loop.is_closed():
            coro.close()
            raise errors.UnavailableError("the connector is closed", code=ErrorCode.SHUTTING_DOWN)
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise errors.DeadlineExceededError(f"no answer within {timeout:g} s") from None
        except concurrent.futures.CancelledError:
            raise errors.UnavailableError("the call was cancelled", code=ErrorCode.SHUTTING_DOWN) from None

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        """``fn(*args)`` run on the loop's thread (for SDK calls that are not coroutines)."""

        async def invoke() -> T:
            return fn(*args)

        return self.run(invoke(), timeout)

    def close(self, final: Awaitable[Any] | None = None, timeout: float = 10.0) -> None:
        """Run ``final`` (e.g. the client's close) on the loop, then stop it."""
        if self.loop.is_closed():
            if final is not None:
                final.close()
            return
        try:
            if final is not None:
                self.run(final, timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.loop.close()
