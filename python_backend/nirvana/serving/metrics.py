"""Custom Prometheus metrics through the python backend's `pb_utils.MetricFamily`, on Triton's `/metrics`.

Two sources: each `nirvana` orchestrator instance counts what happened to its requests (`RequestMetrics`), and the
single `cache` model reports the cache's state (`CacheStateMetrics`).

Several instances (stub processes) create the same families: Triton registers a family name once (prometheus-cpp
merges a second registration of the same name and kind) and hands every `Metric` with the same labels the one
underlying series, reference-counted (core `MetricFamily::Add`). So each instance's unlabelled counters and
histograms increment the same series and the totals add up, while a gauge has a single writer (the `cache` model).
The names are those of docs/serving.md ("Metrics"); the descriptions below are shared so every registration agrees.

A python backend `Metric` is not safe to use from two threads at once: each keeps one shared-memory message that every
call rewrites, and the call releases the GIL while the server reads it. Two threads incrementing at the same time
left the server reading a message the other had freed, and tritonserver died (SIGSEGV in
`ProcessMetricRequest`, seen with the step scheduler's worker threads). So every metric made here is a
`LockedMetric`: one lock per process around every call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from nirvana.cache.outcome import Reason

log = logging.getLogger(__name__)
# Retrieval = search + selection + latent load (ms). Buckets span the sub-millisecond mirror to a slow Milvus.
RETRIEVAL_BUCKETS_MS = [0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250]
# |predicted − actual| / actual server time of a request
PREDICTION_ERROR_BUCKETS = [0.02, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0]
UNAVAILABLE = ("nirvana_cache_unavailable_total", "Requests served uncached: Milvus or the cache model unreachable")


_METRIC_CALLS = threading.Lock()  # one per stub process: see the module's docstring


class LockedMetric:
    """A `pb_utils.Metric` whose calls never overlap another metric call of this process."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric

    def increment(self, value: float) -> None:
        with _METRIC_CALLS:
            self._metric.increment(value)

    def set(self, value: float) -> None:
        with _METRIC_CALLS:
            self._metric.set(value)

    def observe(self, value: float) -> None:
        with _METRIC_CALLS:
            self._metric.observe(value)


class Families:
    """Creates unlabelled metrics (`LockedMetric`) and keeps their families alive (a MetricFamily must outlive its
    Metrics)."""

    def __init__(self, pb_utils: Any) -> None:
        self._family = pb_utils.MetricFamily
        self._kept: list[Any] = []

    def metric(self, name: str, help_text: str, kind: Any, **kwargs: Any) -> Any:
        self._kept.append(self._family(name=name, description=help_text, kind=kind))
        return LockedMetric(self._kept[-1].Metric(labels={}, **kwargs))

    def counter(self, name: str, help_text: str) -> Any:
        return self.metric(name, help_text, self._family.COUNTER)

    def gauge(self, name: str, help_text: str) -> Any:
        return self.metric(name, help_text, self._family.GAUGE)

    def labelled_gauges(self, name: str, help_text: str, label: str) -> Callable[[str], Any]:
        """``get(value)`` → the gauge of this family with ``{label: value}``, made on first use and kept."""
        family = self._family(name=name, description=help_text, kind=self._family.GAUGE)
        self._kept.append(family)
        made: dict[str, Any] = {}

        def get(value: str) -> Any:
            if value not in made:
                made[value] = LockedMetric(family.Metric(labels={label: value}))
            return made[value]

        return get


class _Delta:
    """Increments a counter by how much a monotonic count read elsewhere grew since the last call."""

    def __init__(self, counter: Any, seen: int) -> None:
        self.counter, self.seen = counter, seen

    def update(self, value: int) -> None:
        if value > self.seen:
            self.counter.increment(value - self.seen)
            self.seen = value


class RequestMetrics:
    """Per-request counters of one `nirvana` instance; `cache` is its `BlsCache` (calls that failed count as
    unavailable, in the series the cache model counts Milvus outages in). `service`: the engine's `ServiceTimes`,
    whose predictions a router reads here (the gauges are set as each request finishes, by whichever instance
    finished it: every instance reads the same load board)."""

    def __init__(self, pb_utils: Any, cache: Any, service: Any = None) -> None:
        make = Families(pb_utils)
        self._families = make
        self._cache, self._service = cache, service
        self._lock = threading.Lock()  # requests finish on several threads
        self.hits = make.counter("nirvana_cache_hits_total", "Requests that resumed from a cached latent")
        self.misses = make.counter(
            "nirvana_cache_misses_total", "Requests that ran all steps (cache on, no usable entry)"
        )
        self.bypass = make.counter("nirvana_cache_bypass_total", "Requests with CACHE_MODE=bypass")
        self.refresh = make.counter(
            "nirvana_cache_refresh_total", "Requests with CACHE_MODE=refresh (no lookup, re-admit)"
        )
        self.rejected_requests = make.counter("nirvana_requests_rejected_total", "Requests rejected for invalid input")
        self.skipped = make.counter("nirvana_skipped_steps_total", "Denoising steps skipped thanks to the cache")
        self.unet_steps = make.counter("nirvana_unet_steps_total", "Denoising steps run")
        self.non_finite = make.counter(
            "nirvana_non_finite_total", "Generations that produced NaN/inf (never cached; retried uncached or failed)"
        )
        self.retrieval = make.metric(
            "nirvana_retrieval_latency_ms",
            "Search + selection + latent load (ms)",
            pb_utils.MetricFamily.HISTOGRAM,
            buckets=RETRIEVAL_BUCKETS_MS,
        )
        self._unreachable = _Delta(make.counter(*UNAVAILABLE), getattr(cache, "failures", 0))
        self.prediction_error = make.metric(
            "nirvana_prediction_error_ratio",
            "|predicted - actual| / actual server time per request (predicted once the cache has answered)",
            pb_utils.MetricFamily.HISTOGRAM,
            buckets=PREDICTION_ERROR_BUCKETS,
        )
        self.drain = make.gauge(
            "nirvana_predicted_drain_ms", "Predicted ms until the requests now denoising finish their steps"
        )
        self.step_ms = make.labelled_gauges(
            "nirvana_unet_step_ms", "Learnt ms of one UNet execution by the requests sharing it", "requests"
        )

    def observe(self, result: Any) -> None:
        with self._lock:
            if result.reason == Reason.BYPASS:
                self.bypass.increment(1)
            elif result.reason == Reason.REFRESH:
                self.refresh.increment(1)
            elif result.cache_hit:
                self.hits.increment(1)
            else:
                self.misses.increment(1)
            self.non_finite.increment(result.non_finite)
            self.skipped.increment(result.skipped_steps)
            self.unet_steps.increment(result.steps - result.skipped_steps)
            if "search_ms" in result.timings_ms:
                keys = ("search_ms", "select_ms", "latent_load_ms")
                self.retrieval.observe(sum(result.timings_ms.get(k, 0.0) for k in keys))
            self._unreachable.update(getattr(self._cache, "failures", 0))
            predicted, actual = result.timings_ms.get("predicted_total_ms"), result.timings_ms.get("total_ms")
            if predicted is not None and actual:
                self.prediction_error.observe(abs(predicted - actual) / actual)
            if self._service is not None:
                self._publish_costs()

    def _publish_costs(self) -> None:
        drain = self._service.drain_ms()
        if drain is not None:
            self.drain.set(drain)
        for sharing, ms in self._service.step_levels().items():
            self.step_ms(str(sharing)).set(ms)

    def rejected(self) -> None:
        with self._lock:
            self.rejected_requests.increment(1)

    def failed_non_finite(self) -> None:
        with self._lock:
            self.non_finite.increment(1)


class CacheStateMetrics:
    """The cache's state, reported by the one `cache` model: after every request and every `interval_s` (entries
    change without requests too: another replica's admissions and evictions reach the mirror by refresh).
    `admissions`: the model's write-behind `AdmissionQueue`, if any (its depth and drops; 0 without); `buckets` and
    `gate`: its per-tenant rate limit and internal-credential check (`refused` counts of each)."""

    def __init__(
        self,
        pb_utils: Any,
        cache: Any,
        interval_s: float = 1.0,
        admissions: Any = None,
        buckets: Any = None,
        gate: Any = None,
    ) -> None:
        make = Families(pb_utils)
        self._families = make
        self._cache, self._admissions, self._buckets, self._gate = cache, admissions, buckets, gate
        self._lock = threading.Lock()
        counters, probes = cache.counters, cache.probes
        self._evictions = _Delta(
            make.counter("nirvana_cache_evictions_total", "Cached latents evicted by LCBFU"), counters.evictions
        )
        self._near_misses = _Delta(
            make.counter("nirvana_near_miss_queries_total", "Misses just below the lowest threshold"),
            probes.near_misses,
        )
        self._unavailable = _Delta(make.counter(*UNAVAILABLE), counters.unavailable)
        self.bytes = make.gauge("nirvana_cache_bytes", "Bytes of cached latents on disk")
        self.entries = make.gauge("nirvana_cache_entries", "Cached latents")
        self.suspects = make.gauge(
            "nirvana_probing_suspect_tenants", "Tenants with many near misses (possible probing)"
        )
        self.available = make.gauge("nirvana_cache_available", "1 while Milvus (the store of record) is reachable")
        self.queue_depth = make.gauge("nirvana_admission_queue_depth", "Admissions queued, not yet written")
        self._dropped = _Delta(
            make.counter("nirvana_admissions_dropped_total", "Admissions dropped: the write-behind queue was full"),
            getattr(admissions, "dropped", 0),
        )
        self._rate_limited = _Delta(
            make.counter("nirvana_rate_limited_total", "Cache lookups refused: the tenant was over its rate"),
            getattr(buckets, "refused", 0),
        )
        self._refused = _Delta(
            make.counter("nirvana_internal_refused_total", "Cache requests without the internal credential"),
            getattr(gate, "refused", 0),
        )
        self.update()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._every, args=(interval_s,), name="cache-metrics", daemon=True)
        self._thread.start()

    def update(self) -> None:
        cache = self._cache
        with self._lock:
            self._evictions.update(cache.counters.evictions)
            self._near_misses.update(cache.probes.near_misses)
            self._unavailable.update(cache.counters.unavailable)
            self.suspects.set(cache.probes.suspects())
            self.available.set(1 if cache.available else 0)
            self.bytes.set(cache.total_bytes)
            self.entries.set(cache.entries)
            self.queue_depth.set(getattr(self._admissions, "depth", 0))
            self._dropped.update(getattr(self._admissions, "dropped", 0))
            self._rate_limited.update(getattr(self._buckets, "refused", 0))
            self._refused.update(getattr(self._gate, "refused", 0))

    def _every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.update()
            except Exception as err:  # never let a metrics hiccup end the reporting thread
                log.warning("cache metrics update failed: %s", err)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
