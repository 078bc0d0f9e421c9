"""AdmissionQueue: admissions written behind the response, by one writer thread, in the order they were submitted.

Writing a miss's latents and recording its row costs milliseconds (≈ 7 ms for five SD1.5 latents) that the request
need not wait for: the `cache` model answers `admit` once the admission is queued. The queue is bounded
(`max_depth`): when it is full the admission is dropped and counted, never the request — a cache may always decline
to cache. What this costs:

* a lookup that arrives while an admission of the same prompt is still queued misses (it is not in the mirror yet);
* a crash loses the queued admissions (at most `max_depth`). The one being written may leave latent files with no
  row, which `reconcile` removes at the next open, as after any crash mid-admission.

A clean stop (`close`) writes everything queued before it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from nirvana.cache.manager import ApproximateCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admission:
    """The arguments of one `ApproximateCache.admit` call (`states`: K → ResumeState arrays)."""

    prompt: str
    vector: np.ndarray
    cache_key: str
    tenant: str
    states: Mapping[int, Mapping[str, np.ndarray]]
    replace: bool = False
    meta: dict[str, Any] | None = field(default=None)

    def write_to(self, cache: ApproximateCache) -> int:
        """Admit into `cache` now; returns how many latents were written."""
        return cache.admit(
            self.prompt,
            self.vector,
            self.cache_key,
            self.tenant,
            dict(self.states),
            replace=self.replace,
            meta=self.meta,
        )


class AdmissionQueue:
    """Bounded FIFO of admissions in front of `cache`, drained by one writer thread. Thread-safe.

    `depth`: admissions queued and not yet started; `dropped`: admissions refused because the queue was full or
    closed; `written`: latents the writer has admitted; `failed`: admissions that raised (logged and skipped).
    """

    def __init__(self, cache: ApproximateCache, max_depth: int) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth={max_depth}: must be at least 1 (0 means no queue: admit synchronously)")
        self.cache, self.max_depth = cache, max_depth
        self.dropped = self.written = self.failed = 0
        self._queue: deque[Admission] = deque()
        self._busy = False  # the writer is inside cache.admit
        self._closed = False
        self._changed = threading.Condition()
        self._writer = threading.Thread(target=self._drain_forever, name="cache-admissions", daemon=True)
        self._writer.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, admission: Admission) -> bool:
        """Queue one admission; False (and counted in `dropped`) if the queue is full or closed."""
        with self._changed:
            if self._closed or len(self._queue) >= self.max_depth:
                self.dropped += 1
                return False
            self._queue.append(admission)
            self._changed.notify_all()
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is written; False if `timeout` (s) passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def close(self, timeout: float | None = 60.0) -> bool:
        """Refuse new admissions, write the queued ones, stop the writer. False if some were still queued after
        `timeout` (s): those are lost, as in a crash."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        drained = self.drain(timeout)
        if not drained:  # give up on what is still queued, so nothing is written after the cache closes
            with self._changed:
                lost = len(self._queue)
                self._queue.clear()
                self.dropped += lost
            log.warning("admission queue closed after %s s with %d admissions unwritten", timeout, lost)
        self._writer.join(timeout=timeout)
        return drained

    def _drain_forever(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if not self._queue:  # closed and empty
                    return
                admission = self._queue.popleft()
                self._busy = True
            try:
                self._write(admission)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _write(self, admission: Admission) -> None:
        try:
            written = admission.write_to(self.cache)
        except Exception:  # one bad admission must not stop the ones behind it
            log.exception("queued admission of %r failed", admission.prompt[:80])
            with self._changed:
                self.failed += 1
            return
        with self._changed:
            self.written += written
