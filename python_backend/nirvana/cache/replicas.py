"""Replica synchronisation: keep this process's mirror up to date with a Milvus that other replicas write too.

Several replicas (processes) may share one cache: one Milvus server and one latent directory. Each mirrors Milvus
at open and refreshes its mirror every `refresh_interval_s` (`refresh`): prompts another replica admitted become
hits here, entries it evicted leave. Milvus has no compare-and-set, so a racing flush of another replica can
overwrite a hit count; a replica that has seen the larger count writes it back, at its next refresh and once more
when it stops (`settle`), so counts converge (see the `index` module docstring for what can still be lost).

Replica ids default to host name and process id, so every restart adds one count per entry it hits. A replica
whose counts have not grown for `replica_retire_s` (as this replica's refreshes see them) is retired (`retire`): its
counts are folded into one anonymous count, leaving a tombstone that keeps a stale copy from bringing them back
(`records.EntryMeta.retire`). On a milvus-lite file, one process is the only writer: every other replica id is
retired when it opens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from nirvana.cache.index import MilvusIndex
from nirvana.cache.mirror import Mirror
from nirvana.cache.reconcile import Reconciler
from nirvana.cache.records import UNATTRIBUTED, EntryMeta, PromptRecord, RowChange, merge_entries
from nirvana.config import CacheConfig

log = logging.getLogger(__name__)

# At close on a shared Milvus: wait flush_interval_s + this for racing flushes of other replicas to land, then check.
SETTLE_MARGIN_S, SETTLE_ROUNDS = 1.0, 3
# Rows merged (refresh) or counted (retire) per hold of the mirror lock: ~10k rows take tens of ms, where a million
# in one hold would stop every lookup for seconds
CHUNK_ROWS = 10_000


def _ahead(mine: EntryMeta, stored: EntryMeta) -> bool:
    """Whether some replica's count in `mine` is larger than in `stored` (a racing flush overwrote it)."""
    return any(
        n > stored.replica_hits.get(replica, 0) >= 0 for replica, n in mine.replica_hits.items()
    )  # a stored tombstone (< 0) is never "behind": the count is folded in already


def _any_ahead(mine: dict[int, EntryMeta], stored: dict[int, EntryMeta]) -> bool:
    return any(_ahead(e, stored[k]) for k, e in mine.items() if k in stored)


class ReplicaSync:
    """Refreshes `mirror` from Milvus and repairs hit counts a racing flush lost."""

    def __init__(self, config: CacheConfig, mirror: Mirror, reconciler: Reconciler) -> None:
        self.config, self.mirror, self.reconciler = config, mirror, reconciler
        self.last_refresh_at = time.monotonic()
        self.replica: str | None = None  # this process's replica id (set by the cache): never retired
        # Per replica id: its hit total over the mirror at the last check, and when (time.time()) it last grew
        self._totals: dict[str, int] = {}
        self._seen: dict[str, float] = {}
        self.retired = 0  # replica ids retired so far

    def start(self, current_index: Callable[[], MilvusIndex | None], closed: threading.Event) -> None:
        """Refresh every `refresh_interval_s` in a background thread until `closed` is set."""

        def loop() -> None:
            while not closed.wait(self.config.refresh_interval_s):
                index = current_index()
                if index is None:
                    continue
                try:
                    self.refresh(index)
                except Exception as err:  # Milvus down or closing: the mirror stays as it is until the next try
                    if not closed.is_set():
                        log.warning("cache mirror refresh failed: %s", err)

        threading.Thread(target=loop, name="cache-refresh", daemon=True).start()

    def refresh(self, index: MilvusIndex) -> dict[str, int]:
        """Bring the mirror up to date with Milvus, which other replicas write too. Returns counts of prompts
        added, removed and updated, and of rows queued for a rewrite.

        Held under the index's flush lock, so each of this process's changes is seen once: still queued, or
        already stored. A row in which Milvus holds a lower count (of any replica) than this mirror has seen
        (a racing flush overwrote it) is queued again: that is what makes the per-replica counts converge.
        Cost: one scan of every row's id and entries (no vectors) plus a fetch of the rows new to this replica.
        """
        counts = dict.fromkeys(("added", "removed", "updated", "rewritten"), 0)
        with index.flush_lock:
            self.last_refresh_at = time.monotonic()
            stored = index.scan_entries()
            held = self.mirror.ids()
            fetched = index.fetch(new_ids) if (new_ids := [i for i in stored if i not in held]) else {}
            # A scan can miss rows (measured: Milvus 2.3.5's query iterator right after a bulk insert returned
            # 6,677 of 8,000 rows): a row is gone only if a read by id does not find it either.
            unseen = [row_id for row_id in held if row_id not in stored]
            stored.update((row_id, r.entries) for row_id, r in (index.fetch(unseen) if unseen else {}).items())
            row_ids = list(set(stored) | self.mirror.ids())
            for start in range(0, len(row_ids), CHUNK_ROWS):
                with self.mirror.lock:  # a chunk at a time: a lookup waits for one chunk, not for every row
                    pending = index.pending_changes()  # read again: puts go on between chunks (flushes do not)
                    for row_id in row_ids[start : start + CHUNK_ROWS]:
                        self._refresh_row(
                            index, row_id, stored.get(row_id), fetched.get(row_id), pending.get(row_id), counts
                        )
            self.reconciler.remove_orphans(index)
        counts["retired"] = self.retire(index)
        if any(counts.values()):
            log.info("cache mirror refreshed: %s", counts)
        return counts

    def _refresh_row(
        self,
        index: MilvusIndex,
        row_id: int,
        stored: dict[int, EntryMeta] | None,
        fetched: PromptRecord | None,
        change: RowChange | None,
        counts: dict[str, int],
    ) -> None:
        """One row of `refresh`, under the mirror lock."""
        local = self.mirror.get(row_id)
        merged = merge_entries(stored, local.entries if local else {}, change)
        if local is None:
            if merged and fetched is not None:  # fetched is None: deleted between the scan and the fetch
                fetched.entries = merged
                self.mirror.add(fetched)
                counts["added"] += 1
            return
        changed = merged != local.entries
        if changed:  # most rows, most refreshes: nothing to change (and a change moves the row in the eviction order)
            self.mirror.set_entries(local, merged)
        if not merged:
            counts["removed"] += 1
            return
        counts["updated"] += changed
        if stored is not None and _any_ahead(merged, stored):
            # Milvus holds a count lower than one we have seen: write the larger one back
            index.put(self.mirror.stored(local))
            counts["rewritten"] += 1

    def retire(self, index: MilvusIndex, everyone_else: bool = False, now: float | None = None) -> int:
        """Fold the hit counts of replicas not seen for `replica_retire_s` (every other one with `everyone_else`)
        into one anonymous count per entry; returns how many replica ids were retired."""
        now = time.time() if now is None else now
        records = self.mirror.records()
        totals: dict[str, int] = {}
        for start in range(0, len(records), CHUNK_ROWS):
            with self.mirror.lock:  # a chunk at a time, as in `refresh`
                for record in records[start : start + CHUNK_ROWS]:
                    for entry in record.entries.values():
                        for replica, n in entry.replica_hits.items():
                            if n >= 0:  # tombstones: retired already
                                totals[replica] = totals.get(replica, 0) + n
        for replica, total in totals.items():
            if total > self._totals.get(replica, -1) or replica == self.replica:
                self._seen[replica] = now
        horizon = now - self.config.replica_retire_s
        gone = {r for r, at in self._seen.items() if everyone_else or at < horizon} - {self.replica, UNATTRIBUTED}
        for start in range(0, len(records), CHUNK_ROWS):
            with self.mirror.lock:
                for record in records[start : start + CHUNK_ROWS]:
                    if any(e.retire(gone, now) for e in list(record.entries.values())):
                        index.put(self.mirror.stored(record))
        self._totals = {r: n for r, n in totals.items() if r not in gone}
        self._seen = {r: at for r, at in self._seen.items() if r in self._totals}
        self.retired += len(gone)
        if gone:
            log.info("hit counts of %d replicas not seen since %.0f s folded: %s", len(gone), horizon, sorted(gone)[:5])
        return len(gone)

    def settle(self, index: MilvusIndex, rounds: int = SETTLE_ROUNDS) -> None:
        """At close on a shared Milvus: once this replica exits, nobody else can restore a count of it that a racing
        flush of another replica overwrote. So: flush; wait longer than another replica's flush takes from its read
        to its write (one that read a row before our write may land after it); re-read the rows we wrote since
        shortly before our last refresh (it repaired earlier ones) and write back any count Milvus lost; repeat
        until nothing was lost. Takes about flush_interval_s + 1 s."""
        wait_s = self.config.flush_interval_s + SETTLE_MARGIN_S
        since = self.last_refresh_at - wait_s
        index.flush()
        for _ in range(rounds):
            time.sleep(wait_s)
            if not self._rewrite_lost_counts(index, index.written_since(since)):
                return
            index.flush()

    def _rewrite_lost_counts(self, index: MilvusIndex, row_ids: list[int]) -> int:
        """Queue the rows among `row_ids` in which Milvus holds a lower count than the mirror; returns how many."""
        stored = index.fetch(row_ids) if row_ids else {}
        queued = 0
        with self.mirror.lock:
            for row_id, row in stored.items():
                local = self.mirror.get(row_id)
                if local and _any_ahead(local.entries, row.entries):
                    index.put(self.mirror.stored(local))
                    queued += 1
        return queued
