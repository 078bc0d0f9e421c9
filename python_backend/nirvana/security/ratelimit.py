"""Per-tenant token buckets: a tenant that probes the cache faster than `rate` lookups/s is told to retry later.

The published prompt-stealing attack climbs toward a cached prompt through thousands of near queries; a bucket per
tenant caps that rate without touching other tenants. The buckets live in the one `cache` model, so every
orchestrator of a server shares them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["RateLimited", "TenantBuckets"]


class RateLimited(RuntimeError):
    """The tenant is over its lookup rate: the client should retry after `retry_after_s` seconds (UNAVAILABLE)."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = round(max(retry_after_s, 0.1), 1)
        super().__init__(f"this tenant is over its cache lookup rate; retry in {self.retry_after_s} s")


class TenantBuckets:
    """`take(tenant)` → None when allowed, else the seconds until one token is back.

    The least recently seen tenant is forgotten when more than `max_tenants` are tracked, so memory stays bounded
    (a forgotten bucket comes back full; tenants are authenticated identities, so a client cannot mint names to
    reset its own bucket, except in the development mode `tenant_source="client"`)."""

    def __init__(
        self, rate: float, burst: int, max_tenants: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate < 0 or burst < 1:
            raise ValueError(f"rate={rate}, burst={burst}: need rate ≥ 0 and burst ≥ 1")
        self.rate, self.burst, self.max_tenants, self._clock = rate, float(burst), max_tenants, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tenant → (tokens, at)
        self._lock = threading.Lock()
        self.refused = 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, tenant: str) -> float | None:
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(tenant, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[tenant] = (tokens, now)
            self._forget(now)
            if allowed:
                return None
            self.refused += 1
            return (1.0 - tokens) / self.rate

    def _forget(self, now: float) -> None:
        while len(self._buckets) > self.max_tenants:
            self._buckets.popitem(last=False)  # least recently seen
