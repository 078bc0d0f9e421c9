"""`open_cache`: the production composition of the cache, built from a `CacheConfig`.

Latent blobs under `config.latent_dir`, Milvus (`config.resolved_milvus_uri`) as the store of record, mirrored in
process and reconciled with the blobs at open; the mirror's vectors and search training are also kept in a snapshot
file beside the latents, so a reopen (or a new replica of a shared cache) reads neither back (`snapshot`). On a
Milvus server, a background refresh of the mirror from what other replicas wrote. Tests of the request path compose
`ApproximateCache` from an in-memory index instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from nirvana.cache.connection import MilvusConnection
from nirvana.cache.index import MilvusIndex
from nirvana.cache.latents import LatentStore, LatentStoreError
from nirvana.cache.manager import ApproximateCache, CacheCounters
from nirvana.cache.mirror import Mirror
from nirvana.cache.reconcile import Reconciler
from nirvana.cache.records import is_server_uri
from nirvana.cache.replicas import ReplicaSync
from nirvana.cache.snapshot import snapshot_path
from nirvana.config import CacheConfig

log = logging.getLogger(__name__)


def open_cache(config: CacheConfig, dim: int, clock: Callable[[], float] = time.time) -> ApproximateCache:
    """Open the cache for `dim`-dimensional prompt embeddings; `clock` (seconds) stamps admissions and hits.

    Returns at once when Milvus is unreachable: the cache then serves uncached and connects in the background.
    """
    config.dir.mkdir(parents=True, exist_ok=True)
    latents = LatentStore(config.latent_dir, dtype=config.latent_dtype)
    mirror = Mirror(dim, config.search, config.min_entries_per_prompt)
    counters = CacheCounters()
    shared = is_server_uri(config.resolved_milvus_uri)
    # The mirror snapshot, beside the latents: on a shared cache every replica writes it whole at close (an atomic
    # rename: the last one wins) and a new replica reads from it every vector whose row (id, created) Milvus still
    # holds, instead of reading a million vectors from the server (~1 ms each measured on Milvus 2.3).
    snapshot = snapshot_path(config.dir, config.collection)
    reconciler = Reconciler(config, mirror, latents, counters, snapshot)
    replicas = ReplicaSync(config, mirror, reconciler)
    cache = ApproximateCache(
        config,
        mirror,
        latents,
        counters=counters,
        replicas=replicas,
        clock=clock,
        on_close=reconciler.save_snapshot,
        open_timings=reconciler.timings,
    )
    cache.caught_up = reconciler.caught_up
    reconciler.preload()  # the snapshot fills the mirror while Milvus opens

    def publish(index: MilvusIndex) -> bool:
        if not cache.attach(index):
            return False
        if not reconciler.catch_up_due:
            if not index.shared:
                _retire_others(cache, index)
            return True
        in_line = len(mirror) < config.catch_up_in_background_from
        if not (in_line and _catch_up_once(cache, reconciler, index)):  # a failed in-line try goes on in background
            args = (cache, reconciler, index)
            threading.Thread(target=_catch_up, args=args, name="cache-catch-up", daemon=True).start()
        return True

    MilvusConnection(
        config, dim, prepare=reconciler.load, discard=reconciler.discard, publish=publish, closed=cache.closed
    ).open()
    try:  # an unreadable latent directory fails the open, as it did before the walk moved aside
        latents.wait_walked() if reconciler.caught_up.is_set() else latents.check_readable()
    except LatentStoreError:
        cache.closed.set()  # stops the reconnect loop that the failed reconciliation may have started
        cache.detach()  # an index the catch-up published
        raise
    if shared and config.refresh_interval_s > 0:
        replicas.start(lambda: cache.index, cache.closed)
    return cache


def _retire_others(cache: ApproximateCache, index: MilvusIndex) -> None:
    """A milvus-lite file admits one process: the hit counts of any other replica id are final (`replicas`)."""
    cache.replicas.retire(index, everyone_else=True)


def _catch_up_once(cache: ApproximateCache, reconciler: Reconciler, index: MilvusIndex) -> bool:
    """One try of `Reconciler.catch_up`; False if Milvus failed it (to try again)."""
    try:
        reconciler.catch_up(index, cache.replicas.refresh)
        if not index.shared:
            _retire_others(cache, index)
        reconciler.caught_up.set()
    except LatentStoreError as err:  # the directory walk failed: the cache cannot be trusted, nothing to retry
        log.error("latent directory unreadable (%s): the cache is not used until a restart", err)
        cache.detach()
    except Exception as err:
        if not cache.closed.is_set():
            log.warning("cache catch-up with Milvus failed (%s): retrying", err)
            return False
    return True


def _catch_up(cache: ApproximateCache, reconciler: Reconciler, index: MilvusIndex) -> None:
    """`_catch_up_once` until it succeeds or the cache closes (the background thread)."""
    while not cache.closed.is_set() and not _catch_up_once(cache, reconciler, index):
        cache.closed.wait(cache.config.reconnect_interval_s)
