"""Probing monitor: flags tenants that send many near-miss queries.

An approximate cache leaks through its hit/miss behaviour: an attacker who varies a prompt and watches for the
similarity at which it starts hitting can reconstruct cached prompts (USENIX Security'26). Such probing shows as
many queries landing just below the lowest similarity threshold. This counts them per tenant in a sliding window;
the count of tenants over the limit is exported as a metric and logged, so operators can rate-limit them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_TRACKED_TENANTS = 10_000  # tenants with near misses held at once (each a deque of times)


class ProbeMonitor:
    def __init__(
        self,
        margin: float = 0.05,
        window_s: float = 300.0,
        max_near_misses: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.margin, self.window_s, self.max_near_misses, self._clock = margin, window_s, max_near_misses, clock
        self._events: dict[str, deque[float]] = defaultdict(deque)
        self._flagged: set[str] = set()
        self._lock = threading.Lock()
        self.near_misses = 0

    def observe(self, tenant: str, similarity: float, lowest_threshold: float) -> bool:
        """Record a miss; returns True when it was a near miss (within `margin` below the lowest threshold)."""
        if not lowest_threshold - self.margin <= similarity <= lowest_threshold:
            return False
        now = self._clock()
        with self._lock:
            self.near_misses += 1
            if len(self._events) >= MAX_TRACKED_TENANTS and tenant not in self._events:
                self._forget_quiet(now)
            events = self._events[tenant]
            events.append(now)
            while events and events[0] < now - self.window_s:
                events.popleft()
            if len(events) > self.max_near_misses and tenant not in self._flagged:
                self._flagged.add(tenant)
                log.warning(
                    "tenant %r sent %d near-miss queries in %.0f s: possible cache probing",
                    tenant,
                    len(events),
                    self.window_s,
                )
        return True

    def _forget_quiet(self, now: float) -> None:
        """Bound the per-tenant memory: drop tenants with no near miss in the window, then (all busy) the quietest."""
        for tenant, events in list(self._events.items()):
            while events and events[0] < now - self.window_s:
                events.popleft()
            if not events:
                del self._events[tenant]
        if len(self._events) >= MAX_TRACKED_TENANTS:
            for tenant in sorted(self._events, key=lambda t: len(self._events[t]))[: len(self._events) // 2]:
                del self._events[tenant]

    def suspects(self) -> int:
        """Tenants whose near misses in the current window exceed the limit."""
        now = self._clock()
        with self._lock:
            for tenant, events in list(self._events.items()):
                while events and events[0] < now - self.window_s:
                    events.popleft()
                if not events:
                    del self._events[tenant]
            self._flagged = {t for t, e in self._events.items() if len(e) > self.max_near_misses}
            return len(self._flagged)
