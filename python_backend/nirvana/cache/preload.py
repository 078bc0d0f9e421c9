"""The mirror snapshot read at open, beside Milvus's open (`reconcile.Reconciler` takes what it found).

A format-2 snapshot (`mirror_image`) fills the mirror in a thread started before Milvus is opened, so the two
overlap; a format-1 one (an earlier version's vectors and trainings) is only kept for the open that reads Milvus
first. The mirror's objects are then moved out of the garbage collector's reach (`settle_objects`).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from pathlib import Path

from nirvana.cache.mirror import Mirror
from nirvana.cache.mirror_image import MirrorImage
from nirvana.cache.snapshot import Snapshot, load_snapshot

log = logging.getLogger(__name__)

SETTLE_FROM_PROMPTS = 50_000  # `settle_objects` below this: nothing to gain


class Phases:
    """Seconds per phase of the open, written into `timings` as each phase ends."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings, self.at = timings, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.at
        self.at = now


class SnapshotPreload:
    """Reads the snapshot at `path` (None: no snapshot) into `mirror`; its phases go into `timings`.

    `loaded`: the mirror holds the snapshot's image and nobody has taken it yet; `format1`: a format-1 file's
    vectors and trainings (empty otherwise).
    """

    def __init__(self, path: Path | None, mirror: Mirror, timings: dict[str, float]) -> None:
        self.path, self.mirror, self.timings = path, mirror, timings
        self.loaded = False
        self.format1 = Snapshot.empty(mirror.dim)
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> bool:
        """A read is running or its image waits to be taken: the mirror is the snapshot's, not a failed load's."""
        return self._thread is not None or self.loaded

    def start(self) -> None:
        if self.path is not None:
            self._thread = threading.Thread(target=self.fill, name="cache-preload", daemon=True)
            self._thread.start()

    def wait(self) -> bool:
        """Wait for a read started by `start`; False if none was running."""
        if self._thread is None:
            return False
        self._thread.join()
        self._thread = None
        return True

    def fill(self) -> None:
        """Read the snapshot now: fill the mirror from a format-2 image, keep a format-1 file's vectors."""
        clock = Phases(self.timings)
        empty = Snapshot.empty(self.mirror.dim)
        image = load_snapshot(self.path, self.mirror.dim) if self.path else empty
        clock.lap("image_load_s")
        self.format1 = empty if isinstance(image, MirrorImage) else image  # empty: none or damaged
        if not isinstance(image, MirrorImage):
            return
        try:
            self.mirror.restore(image.records, image.states)
            self.loaded = True
            settle_objects(len(self.mirror))
        except Exception as err:  # a snapshot that does not fit costs the slower open, never a failed one
            log.warning("mirror snapshot %s not used (%s): the mirror is read from Milvus", self.path, err)
            self.mirror.reset()
        clock.lap("image_restore_s")

    def take_format1(self) -> Snapshot:
        """The format-1 vectors, once (they go into the search)."""
        snapshot, self.format1 = self.format1, Snapshot.empty(self.mirror.dim)
        return snapshot


def settle_objects(prompts: int) -> None:
    """Move what the open allocated (a million records, entries and their dicts) out of the garbage collector's
    reach: they live as long as the process, and a full collection walking them stopped every thread for about a
    second (measured at 1M: the worst lookup during the catch-up after a restart). Only for large mirrors: the
    collection before the freeze costs 0.15 s in a process that has imported torch."""
    if prompts >= SETTLE_FROM_PROMPTS:
        gc.collect()
        gc.freeze()
