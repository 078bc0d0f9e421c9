"""The Milvus connection: open the index, fill the mirror from it, publish it; retry while Milvus is unreachable.

Milvus is the store of record, but the cache must not keep the server from starting or serving: when Milvus is
down at open, requests are served uncached (`ApproximateCache.index` is None) and a background thread retries
with exponential backoff, from half a second up to `reconnect_interval_s`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from nirvana.cache.index import MilvusIndex
from nirvana.config import CacheConfig

log = logging.getLogger(__name__)


class MilvusConnection:
    """Opens `MilvusIndex` for a cache.

    `prepare(index)` fills the mirror from the new index (it may raise: the connection then counts as failed);
    `discard()` empties the mirror after such a failure; `publish(index)` hands the index to the cache, and returns
    False when the cache was closed meanwhile (the index is then closed here, so no client leaks). Retrying stops
    when `closed` is set.
    """

    def __init__(
        self,
        config: CacheConfig,
        dim: int,
        prepare: Callable[[MilvusIndex], None],
        discard: Callable[[], None],
        publish: Callable[[MilvusIndex], bool],
        closed: threading.Event,
    ) -> None:
        self.config, self.dim = config, dim
        self._prepare, self._discard, self._publish, self._closed = prepare, discard, publish, closed

    def open(self) -> bool:
        """Connect now; on failure keep retrying in the background. Returns whether the first attempt succeeded."""
        if self.connect():
            return True
        threading.Thread(target=self._reconnect_loop, name="milvus-reconnect", daemon=True).start()
        return False

    def connect(self) -> bool:
        """One attempt: open Milvus, prepare, publish. On failure log, stay uncached, and return False."""
        uri = self.config.resolved_milvus_uri
        index = None
        try:
            index = MilvusIndex(
                uri, self.config.collection, self.dim, self.config.flush_interval_s, self.config.rpc_timeout_s
            )
            self._prepare(index)
        except Exception as err:
            if index is not None:
                with contextlib.suppress(Exception):
                    index.close()
            self._discard()
            log.warning(
                "Milvus at %s unavailable (%s): serving uncached, retrying (at most every %.0f s)",
                uri,
                err,
                self.config.reconnect_interval_s,
            )
            return False
        if not self._publish(index):  # closed while we were connecting
            index.close()
        return True

    def _reconnect_loop(self) -> None:
        # Back off from half a second: right after a restart the previous process may hold milvus-lite's lock
        # for a moment, and requests are served uncached until we get in.
        delay = min(0.5, self.config.reconnect_interval_s)
        while not self._closed.wait(delay):
            if self.connect():
                log.warning("Milvus at %s is back: caching resumed", self.config.resolved_milvus_uri)
                return
            delay = min(delay * 2, self.config.reconnect_interval_s)
