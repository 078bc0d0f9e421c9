"""Custom Prometheus metrics of the `nirvana` model, through the python backend's `pb_utils.MetricFamily`.

They appear on Triton's metrics endpoint (`/metrics`) beside Triton's own `nv_*` metrics.
"""

from __future__ import annotations

import threading
from typing import Any

from nirvana.cache.outcome import Reason

# Retrieval = search + selection + latent load (ms). Buckets span the sub-millisecond mirror to a slow Milvus.
RETRIEVAL_BUCKETS_MS = [0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250]


class CacheMetrics:
    def __init__(self, pb_utils: Any, cache: Any) -> None:
        family = pb_utils.MetricFamily
        self._cache = cache
        self._evictions_seen = cache.counters.evictions
        self._lock = threading.Lock()  # requests finish on several threads
        self._families: list[Any] = []  # a MetricFamily must outlive its Metrics, or updates fail

        def metric(name: str, help_text: str, kind: Any, **kwargs: Any) -> Any:
            self._families.append(family(name=name, description=help_text, kind=kind))
            return self._families[-1].Metric(labels={}, **kwargs)

        def counter(name: str, help_text: str) -> Any:
            return metric(name, help_text, family.COUNTER)

        def gauge(name: str, help_text: str) -> Any:
            return metric(name, help_text, family.GAUGE)

        self.hits = counter("nirvana_cache_hits_total", "Requests that resumed from a cached latent")
        self.misses = counter("nirvana_cache_misses_total", "Requests that ran all steps (cache on, no usable entry)")
        self.bypass = counter("nirvana_cache_bypass_total", "Requests with CACHE_MODE=bypass")
        self.refresh = counter("nirvana_cache_refresh_total", "Requests with CACHE_MODE=refresh (no lookup, re-admit)")
        self.rejected_requests = counter("nirvana_requests_rejected_total", "Requests rejected for invalid input")
        self.skipped = counter("nirvana_skipped_steps_total", "Denoising steps skipped thanks to the cache")
        self.unet_steps = counter("nirvana_unet_steps_total", "Denoising steps run")
        self.evictions = counter("nirvana_cache_evictions_total", "Cached latents evicted by LCBFU")
        self.bytes = gauge("nirvana_cache_bytes", "Bytes of cached latents on disk")
        self.entries = gauge("nirvana_cache_entries", "Cached latents")
        self.near_misses = counter("nirvana_near_miss_queries_total", "Misses just below the lowest threshold")
        self.suspects = gauge("nirvana_probing_suspect_tenants", "Tenants with many near misses (possible probing)")
        self._near_misses_seen = cache.probes.near_misses
        self.available = gauge("nirvana_cache_available", "1 while Milvus (the store of record) is reachable")
        self.unavailable = counter("nirvana_cache_unavailable_total", "Requests served uncached: Milvus unreachable")
        self._unavailable_seen = cache.counters.unavailable
        self.retrieval = metric(
            "nirvana_retrieval_latency_ms",
            "Search + selection + latent load (ms)",
            family.HISTOGRAM,
            buckets=RETRIEVAL_BUCKETS_MS,
        )
        self._update_gauges()

    def observe(self, result: Any) -> None:
        with self._lock:
            self._observe(result)

    def _observe(self, result: Any) -> None:
        if result.reason == Reason.BYPASS:
            self.bypass.increment(1)
        elif result.reason == Reason.REFRESH:
            self.refresh.increment(1)
        elif result.cache_hit:
            self.hits.increment(1)
        else:
            self.misses.increment(1)
        self.skipped.increment(result.skipped_steps)
        self.unet_steps.increment(result.steps - result.skipped_steps)
        retrieval = sum(result.timings_ms.get(k, 0.0) for k in ("search_ms", "select_ms", "latent_load_ms"))
        if "search_ms" in result.timings_ms:
            self.retrieval.observe(retrieval)
        self._update_gauges()

    def rejected(self) -> None:
        with self._lock:
            self.rejected_requests.increment(1)
            self._update_gauges()

    def _update_gauges(self) -> None:
        evictions = self._cache.counters.evictions
        if evictions > self._evictions_seen:
            self.evictions.increment(evictions - self._evictions_seen)
            self._evictions_seen = evictions
        near = self._cache.probes.near_misses
        if near > self._near_misses_seen:
            self.near_misses.increment(near - self._near_misses_seen)
            self._near_misses_seen = near
        self.suspects.set(self._cache.probes.suspects())
        self.available.set(1 if self._cache.available else 0)
        unavailable = self._cache.counters.unavailable
        if unavailable > self._unavailable_seen:
            self.unavailable.increment(unavailable - self._unavailable_seen)
            self._unavailable_seen = unavailable
        self.bytes.set(self._cache.total_bytes)
        self.entries.set(self._cache.entries)
