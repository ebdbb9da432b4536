"""What keeps one client from starving the rest: bounds on the work in flight.

- Inline bytes: the values a Get holds in the daemon's memory between reading
  them and sending them are bounded daemon-wide, per tenant and per client
  connection. A Get is answered with as many of its blocks as fit what is left
  (the protocol's partial answer: the SDK asks again for the rest), at least one;
  when nothing is left it waits for room, and past ``wait`` seconds it is refused
  with RESOURCE_EXHAUSTED (TOO_MANY_IN_FLIGHT), which the SDK retries.
- Requests: at most ``tenant_requests`` Data calls of one tenant run at once;
  beyond that, RESOURCE_EXHAUSTED (TOO_MANY_IN_FLIGHT) at once.
- Rates: a namespace's policy may set requests per second (a token bucket per
  daemon); beyond it, RESOURCE_EXHAUSTED (RATE_LIMITED).

gRPC itself bounds each connection's concurrent streams and closes silent and
idle connections (``Daemon``'s server options); the local channel stops reading
a socket with too many calls in flight (``rpc.local``).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass

from kvstore import errors
from kvstore.protocol.codes import ErrorCode


@dataclass
class Bucket:
    """A token bucket: ``rate`` requests per second, up to ``burst`` at once."""

    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Admission:
    def __init__(
        self,
        *,
        total_bytes: int,
        tenant_bytes: int,
        connection_bytes: int,
        tenant_requests: int,
        wait: float = 30.0,
        metrics=None,
    ) -> None:
        self.limits = {"daemon": total_bytes, "tenant": tenant_bytes, "connection": connection_bytes}
        self.tenant_requests = tenant_requests
        self.wait = wait
        self.metrics = metrics
        self.bytes_total = 0
        self.bytes_by_tenant: dict[str, int] = defaultdict(int)
        self.bytes_by_connection: dict[str, int] = defaultdict(int)
        self.requests_by_tenant: dict[str, int] = defaultdict(int)
        self.buckets: dict[tuple[str, str], Bucket] = {}
        self._waiters: set[asyncio.Future] = set()

    # -- requests and rates --------------------------------------------------

    def admit(self, tenant: str, subtenant: str, rate: float = 0.0, burst: int = 0) -> None:
        """Count one Data call of ``tenant`` in (``done`` counts it out), or refuse it."""
        if rate > 0:
            bucket = self.buckets.get((tenant, subtenant))
            now = time.monotonic()
            if bucket is None or bucket.rate != rate or bucket.burst != max(1, burst or rate):
                size = max(1, burst or rate)
                bucket = self.buckets[(tenant, subtenant)] = Bucket(rate, size, size, now)
            if not bucket.take(now):
                self._refused(tenant, ErrorCode.RATE_LIMITED)
                raise errors.ResourceExhaustedError(
                    f"namespace {tenant}/{subtenant} is limited to {rate:g} requests per second here; retry later",
                    code=ErrorCode.RATE_LIMITED,
                )
        if self.requests_by_tenant[tenant] >= self.tenant_requests:
            self._refused(tenant, ErrorCode.TOO_MANY_IN_FLIGHT)
            raise errors.ResourceExhaustedError(
                f"tenant {tenant} has {self.tenant_requests} requests in flight on this daemon, its limit; retry when some finish",
                code=ErrorCode.TOO_MANY_IN_FLIGHT,
            )
        self.requests_by_tenant[tenant] += 1

    def done(self, tenant: str) -> None:
        left = self.requests_by_tenant[tenant] - 1
        if left:
            self.requests_by_tenant[tenant] = left
        else:
            del self.requests_by_tenant[tenant]

    # -- inline bytes -----------------------------------------------------------

    def room(self, tenant: str, connection: str) -> int:
        return min(
            self.limits["daemon"] - self.bytes_total,
            self.limits["tenant"] - self.bytes_by_tenant.get(tenant, 0),
            self.limits["connection"] - self.bytes_by_connection.get(connection, 0),
        )

    async def reserve(self, tenant: str, connection: str) -> "Reservation":
        """Room for a Get's inline values, held at once: ``budget`` value bytes (at
        least one block is always served; the values and the response they are
        serialised into count twice), ``settle(n)`` once the values read are known,
        ``release()`` once they are sent."""
        if self.room(tenant, connection) <= 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait
            while self.room(tenant, connection) <= 0:
                waiter = loop.create_future()
                self._waiters.add(waiter)
                try:
                    await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
                except TimeoutError:
                    self._refused(tenant, ErrorCode.TOO_MANY_IN_FLIGHT)
                    raise errors.ResourceExhaustedError(
                        f"this daemon holds as many bytes of gets in flight for tenant {tenant} or this connection "
                        "as it allows; retry when some are sent",
                        code=ErrorCode.TOO_MANY_IN_FLIGHT,
                    ) from None
                finally:
                    self._waiters.discard(waiter)
        reservation = Reservation(self, tenant, connection, max(1, self.room(tenant, connection) // 2))
        reservation.settle(reservation.budget)
        return reservation

    def _released(self, tenant: str, connection: str, held: int) -> None:
        self.bytes_total -= held
        for table, key in ((self.bytes_by_tenant, tenant), (self.bytes_by_connection, connection)):
            left = table[key] - held
            if left:
                table[key] = left
            else:
                del table[key]
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_result(None)

    def _refused(self, tenant: str, code: ErrorCode) -> None:
        if self.metrics is not None:
            self.metrics.rate_limited.labels(str(code)).inc()  # not by tenant: open mode lets anyone name one


class Reservation:
    __slots__ = ("admission", "tenant", "connection", "budget", "held")

    def __init__(self, admission: Admission, tenant: str, connection: str, budget: int) -> None:
        self.admission = admission
        self.tenant = tenant
        self.connection = connection
        self.budget = budget
        self.held = 0

    def settle(self, value_bytes: int) -> None:
        """Hold what ``value_bytes`` of values take (twice: values and response) instead."""
        a = self.admission
        delta = 2 * value_bytes - self.held
        if delta < 0:
            self._release(-delta)
            return
        self.held += delta
        a.bytes_total += delta
        a.bytes_by_tenant[self.tenant] += delta
        a.bytes_by_connection[self.connection] += delta

    def release(self, *_ignored) -> None:
        self._release(self.held)

    def _release(self, nbytes: int) -> None:
        if nbytes:
            self.held -= nbytes
            self.admission._released(self.tenant, self.connection, nbytes)
