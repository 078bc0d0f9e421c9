"""Reconciliation of the store of record with the latent directory, at open and (shared cache) shortly after.

A crash can leave a row whose latent was never written or already deleted (dangling entry), or a latent whose row
was never flushed (orphan). At open the cache mirrors Milvus and drops dangling entries, and removes orphan latents.
On a shared cache (a Milvus server, several replicas) a latent no row refers to may be another replica's whose row
is not flushed yet: such candidates are removed only after a grace period (`remove_orphans`, run by the replicas'
mirror refresh), and only if a read by id confirms no row refers to them.

**Open from the snapshot.** With a format-2 snapshot (`mirror_image`) the mirror is filled from it in a thread
started before Milvus's open (`preload`), so the two overlap; `load` then only waits for it, and the cache is
published. What the snapshot cannot know (rows written since it was saved, by this process before a crash or by
other replicas; latents gone since) is caught up after (`catch_up`): a replica refresh (`replicas.ReplicaSync`),
then the missing latents and orphans, against the directory walk. A large cache does that in the background, so a
restart is ready in the time of the slower of Milvus's open and the snapshot's load. Until it is done a lookup may
match an entry whose latent is gone: a miss that removes the entry, as for any missing latent. On a milvus-lite
file (one writer) orphans go at once. A latent this process writes during the catch-up, in the moment between its
write and its entry in the mirror, can be taken for an orphan: that entry is then a miss, and dropped.

**Mass deletion is refused.** A deployment pointed at an empty or foreign Milvus (a wrong URI or collection, a fresh
server) would see every latent as an orphan, and one whose latent volume is missing would see every row as
dangling. When most of what would be removed is removed (`looks_foreign`), the reconciliation logs an error and
keeps the files (and the rows) unless `CacheConfig.reconcile_allow_mass_delete` says to proceed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nirvana.cache.index import MilvusIndex
from nirvana.cache.latents import LatentStore
from nirvana.cache.mirror import Mirror
from nirvana.cache.outcome import CacheCounters
from nirvana.cache.preload import Phases, SnapshotPreload, settle_objects
from nirvana.cache.records import PromptRecord, blob_key, row_of
from nirvana.cache.snapshot import save_snapshot
from nirvana.cache.validation import InvalidRow
from nirvana.config import CacheConfig

log = logging.getLogger(__name__)

MIN_ORPHAN_GRACE_S = 10.0
# Removing at least this many, and more than this fraction, of what is there looks like the wrong Milvus (or volume)
MASS_DELETE_MIN, MASS_DELETE_FRACTION = 32, 0.5
SNAPSHOT_REWRITE_FRACTION = 0.05  # rewrite the snapshot at open when more of the vectors than this came from Milvus
_NO_VECTOR = np.zeros(0, np.float32)  # a record's vector until `_attach_vectors` gives it the real one
# Phases of the open that ran beside the others (the directory walk; the snapshot's preload beside Milvus's open)
BESIDE = frozenset({"latent_scan_s", "image_load_s", "image_restore_s"})
# A snapshot image is caught up with row by row unless Milvus holds more than twice its prompts and this many
STALE_IMAGE_SLACK = 1000


class Reconciler:
    """Loads Milvus into the mirror (`load`) and removes latents no row refers to (`load`, `remove_orphans`).

    `snapshot`: where the mirror snapshot (`snapshot`) lives, or None not to use one. `timings` holds the phases
    of the last `load`, in seconds.
    """

    def __init__(
        self,
        config: CacheConfig,
        mirror: Mirror,
        latents: LatentStore,
        counters: CacheCounters,
        snapshot: Path | None = None,
    ) -> None:
        self.config, self.mirror, self.latents, self.counters = config, mirror, latents, counters
        self.snapshot = snapshot
        self.opened_at = time.monotonic()
        self._orphan_candidates: set[str] = set()  # unreferenced at open, on a shared cache
        self.timings: dict[str, float] = {}
        self._preload = SnapshotPreload(snapshot, mirror, self.timings)
        self.catch_up_due = False  # the mirror came from the snapshot: `catch_up` has to run
        # Set once the mirror agrees with Milvus and the directory: at the end of `load`, or after `catch_up`
        self.caught_up = threading.Event()

    def preload(self) -> None:
        """Start filling the mirror from a format-2 snapshot, beside Milvus's open (`load` waits for it)."""
        self._preload.start()

    def discard(self) -> None:
        """After a failed open (Milvus unreachable): empty what `load` filled; an image it has not taken yet (still
        loading, or loaded) stays for the next `load`."""
        if not self._preload.pending:
            self.mirror.reset()

    def load(self, index: MilvusIndex) -> None:
        """Mirror Milvus in memory; drop entries whose blob is gone and blobs no entry refers to. With the snapshot's
        image in the mirror (`preload`) only take it: `catch_up` does the rest once the cache is published.

        Without it, the latent directory is walked once (by `LatentStore` at open; again only for a reconnect long
        after), rows are read without their vectors, and only the vectors of the rows kept are read: from a format-1
        snapshot where it has them, from Milvus for the rest.
        """
        clock = Phases(self.timings)
        if self._preload.wait():  # the preload's phases are in `timings` already
            clock.lap("preload_wait_s")
        elif not self._preload.loaded:  # a reconnect after a failed open: its own phases
            self.timings.clear()
            self._preload.fill()
            clock = Phases(self.timings)
        if self._preload.loaded and self._fits(index, clock):
            self.catch_up_due = True
            self.caught_up.clear()
            log.info(
                "cache open from the snapshot: %d prompts, %d entries; catching up with Milvus next",
                len(self.mirror),
                self.mirror.entries,
            )
            return
        self._load_from_milvus(index, clock)
        self.caught_up.set()

    def _fits(self, index: MilvusIndex, clock: Phases) -> bool:
        """Whether the snapshot's image is close enough to Milvus to catch up with it row by row; one much smaller
        (an old file, rows imported since) is dropped, and Milvus read in bulk instead."""
        stored = index.count()
        clock.lap("milvus_count_s")
        self._preload.loaded = False
        if stored <= 2 * len(self.mirror) + STALE_IMAGE_SLACK:
            return True
        log.warning(
            "mirror snapshot %s holds %d prompts, Milvus %d: the mirror is read from Milvus",
            self.snapshot,
            len(self.mirror),
            stored,
        )
        self.mirror.reset()
        return False

    def _load_from_milvus(self, index: MilvusIndex, clock: Phases) -> None:
        """`load` without a usable snapshot image: rows from Milvus, vectors from a format-1 snapshot or Milvus."""
        present = self.latents.take_scanned_keys()  # waits for the walk at open, which ran beside Milvus's open
        if present is None:
            present = set(self.latents.keys())
            clock.lap("latent_rescan_s")
        else:
            clock.lap("latent_scan_wait_s")
            self.timings["latent_scan_s"] = self.latents.scan_s  # the walk's own time (overlapped: not a phase)
        rows = list(index.scan_rows())
        clock.lap("milvus_rows_s")
        records, repairs = self._drop_dangling(rows, present)
        clock.lap("reconcile_rows_s")
        records, from_milvus, trained = self._attach_vectors(index, records, clock)
        dangling = sum(len(missing) for _, missing in repairs)
        total_entries = dangling + sum(len(r.entries) for r in records)
        # After an old-format drop (`latents`, logged there) every entry is dangling: that is expected
        if self.latents.old_format_dropped or self._may_delete("entries without a latent", dangling, total_entries):
            for record, missing in repairs:
                try:
                    index.put(record, removed=missing)  # merged at flush: what another replica added stays
                except InvalidRow as err:  # a row an earlier version stored: the store refuses it back
                    log.warning("cache row %016x not repaired: %s", record.id, err)
        else:
            dangling = 0  # kept in Milvus (not served: they have no latent here)
        self.mirror.add_many(records, trained)
        settle_objects(len(self.mirror))
        clock.lap("mirror_fill_s")
        orphans = self._remove_unreferenced(index, present)
        clock.lap("orphans_s")
        if dangling or orphans:
            level = logging.INFO if self.latents.old_format_dropped else logging.WARNING
            log.log(
                level,
                "cache reconciled: %d entries without a latent dropped, %d orphan latents removed",
                dangling,
                orphans,
            )
        with self.mirror.lock:
            self.counters.repaired += dangling + orphans
        if self.snapshot is not None and from_milvus > SNAPSHOT_REWRITE_FRACTION * len(records):
            self.save_snapshot()  # a crash before close then costs only the rows admitted since
            clock.lap("snapshot_save_s")
        log.info(
            "cache open: %d prompts, %d latents, %d bytes (%d vectors read from Milvus); %s",
            len(self.mirror),
            self.mirror.entries,
            self.latents.total_bytes,
            from_milvus,
            ", ".join(f"{name} {value:.2f}" for name, value in self.timings.items()),
        )

    def catch_up(self, index: MilvusIndex, refresh: Callable[[MilvusIndex], dict[str, int]]) -> None:
        """After an open from the snapshot: `refresh` (the replicas' refresh) brings in what Milvus holds that the
        snapshot does not, then entries whose latent is gone leave and latents no entry refers to go."""
        clock = Phases(self.timings)
        present = self.latents.take_scanned_keys()  # first: the walk's keys are handed out for a minute only
        if present is None:
            present = set(self.latents.keys())
        counts = refresh(index)
        clock.lap("catch_up_milvus_s")
        dangling = self._drop_missing_latents(index, present)
        orphans = self._remove_unreferenced(index, present)
        clock.lap("catch_up_latents_s")
        self.catch_up_due = False  # `caught_up` is set by the caller, once its own part is done too
        with self.mirror.lock:
            self.counters.repaired += dangling + orphans
        log.info(
            "cache caught up with Milvus: %s; %d entries without a latent dropped, %d orphan latents removed; %s",
            counts,
            dangling,
            orphans,
            ", ".join(f"{name} {self.timings[name]:.2f}" for name in ("catch_up_milvus_s", "catch_up_latents_s")),
        )

    def _drop_missing_latents(self, index: MilvusIndex, present: set[str]) -> int:
        """Drop the mirror's entries whose latent is not on disk (`present`, then the file itself); returns how many."""
        keys = ((r.id, k, blob_key(r.id, k)) for r in self.mirror.records() for k in list(r.entries))
        missing = [(row_id, k) for row_id, k, key in keys if key not in present and key not in self.latents]
        if not missing:
            return 0
        # After an old-format drop (`latents`, logged there) every entry is missing: that is expected
        if not self.latents.old_format_dropped and not self._may_delete(
            "entries without a latent", len(missing), self.mirror.entries
        ):
            return 0
        with self.mirror.lock:
            for row_id, k in missing:
                if (record := self.mirror.pop_entry(row_id, k)) is not None:
                    try:
                        index.put(self.mirror.stored(record), removed=[k])
                    except InvalidRow as err:
                        log.warning("cache row %016x not repaired: %s", row_id, err)
        return len(missing)

    def _remove_unreferenced(self, index: MilvusIndex, present: set[str]) -> int:
        """Delete the latents in `present` no entry of the mirror refers to (on a shared cache: mark them, for
        `remove_orphans`); returns how many were deleted."""
        unreferenced = sorted(present - self.mirror.blob_keys())
        if not self._may_delete("latents no Milvus row refers to", len(unreferenced), len(present)):
            unreferenced = []
        if index.shared:  # another replica may have written a latent whose row it has not flushed yet
            self._orphan_candidates, unreferenced = set(unreferenced), []
        return sum(self.latents.delete(key) > 0 for key in unreferenced)

    def _drop_dangling(
        self, rows: list[dict], present: set[str]
    ) -> tuple[list[PromptRecord], list[tuple[PromptRecord, list[int]]]]:
        """Records of the rows (vectors not attached yet) without the entries whose blob is gone, and those
        entries (record, Ks) for the store of record."""
        records, repairs = [], []
        for row in rows:
            record = PromptRecord.from_row({**row, "vector": _NO_VECTOR})
            # A key the walk did not see may have been written since by another replica: check the file itself.
            missing = [
                k for k in record.entries if (key := blob_key(record.id, k)) not in present and key not in self.latents
            ]
            for k in missing:
                del record.entries[k]
            if missing:
                repairs.append((record, missing))
            if record.entries:
                records.append(record)
        return records, repairs

    def _attach_vectors(
        self, index: MilvusIndex, records: list[PromptRecord], clock: Phases
    ) -> tuple[list[PromptRecord], int, dict]:
        """Give each record its vector, from the snapshot or Milvus; leaves out rows Milvus no longer has.
        Returns the records, how many vectors came from Milvus, and the snapshot's trainings."""
        snapshot = self._preload.take_format1()
        ids = np.fromiter((r.id for r in records), np.int64, len(records))
        created = np.fromiter((r.created for r in records), np.float64, len(records))
        at = snapshot.positions(ids, created)
        clock.lap("snapshot_match_s")
        fetched = index.fetch_vectors(ids[at < 0].tolist()) if np.any(at < 0) else {}
        clock.lap("milvus_vectors_s")
        kept = []
        for record, i in zip(records, at.tolist(), strict=True):
            vector = snapshot.vectors[i] if i >= 0 else fetched.get(record.id)
            if vector is not None:  # None: removed (by another replica) since the scan
                record.vector = vector
                kept.append(record)
        return kept, len(fetched), snapshot.trained

    def _may_delete(self, what: str, doomed: int, present: int) -> bool:
        """Whether removing `doomed` of `present` things is a repair, not a wipe (see the module docstring)."""
        if not looks_foreign(doomed, present) or self.config.reconcile_allow_mass_delete:
            return True
        log.error(
            "cache reconciliation would delete %d of %d %s: Milvus (%s, collection %r) looks empty or foreign, so "
            "nothing is deleted; if that is intended, set cache.reconcile_allow_mass_delete",
            doomed,
            present,
            what,
            self.config.resolved_milvus_uri,
            self.config.collection,
        )
        return False

    def save_snapshot(self) -> None:
        """Write the mirror snapshot (at close, and at open when many vectors came from Milvus); never raises."""
        if self.snapshot is None:
            return
        try:
            save_snapshot(self.snapshot, self.mirror)
        except Exception as err:
            log.warning(
                "mirror snapshot %s not written (%s): the next open reads vectors from Milvus", self.snapshot, err
            )

    def remove_orphans(self, index: MilvusIndex) -> None:
        """Latents no row referred to at open, and still none now that other replicas had time to flush theirs."""
        grace = max(MIN_ORPHAN_GRACE_S, 3 * self.config.flush_interval_s)
        if not self._orphan_candidates or time.monotonic() - self.opened_at < grace:
            return
        candidates = self._orphan_candidates - self.mirror.blob_keys()
        stored = index.fetch({row_of(key) for key in candidates})  # confirmed by id: a scan can miss rows
        wanted = {blob_key(row_id, k) for row_id, r in stored.items() for k in r.entries}
        doomed = candidates - wanted
        self._orphan_candidates = set()
        if not self._may_delete("latents no Milvus row refers to", len(doomed), self.mirror.entries + len(doomed)):
            return
        orphans = sum(self.latents.delete(key) > 0 for key in doomed)
        if orphans:
            log.warning("cache reconciled: %d orphan latents removed", orphans)
            with self.mirror.lock:
                self.counters.repaired += orphans


def looks_foreign(doomed: int, present: int) -> bool:
    """Removing `doomed` of `present` looks like a wrong store of record rather than crash debris."""
    return doomed >= MASS_DELETE_MIN and doomed > MASS_DELETE_FRACTION * present
