"""Which adapter sets have a UNet model loaded, and loading the others one at a time in the background (LRU).

SwiftDiffusion's rule: a request for a loaded set never waits for another set's load. ``request`` answers a loaded
set at once, on the caller's thread; a set not loaded is handed to one loader thread, and every request for it
waits on the same load (one load per set, however many ask). When more than ``max_loaded`` sets are loaded, the
least recently requested one is unloaded. The loading and unloading themselves are injected: here they are Triton's
model-control API (`nirvana.serving.adapter_model`), in the tests plain functions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["CONTROL_ENV", "DEFAULT_CONTROL_URL", "VariantPool"]

# The server's own gRPC endpoint, where the `adapters` model loads and unloads set models: pb_utils.load_model would
# hold up every response of that model until a load finished (measured: 1.6 s for a warm set's answer).
CONTROL_ENV = "NIRVANA_MODEL_CONTROL_URL"
DEFAULT_CONTROL_URL = "127.0.0.1:8001"

log = logging.getLogger(__name__)
Done = Callable[[str | None, Exception | None], None]


class VariantPool:
    """``load(key) -> model name`` and ``unload(name)`` behind an LRU of at most ``max_loaded`` loaded keys."""

    def __init__(self, load: Callable[[Hashable], str], unload: Callable[[str], None], max_loaded: int) -> None:
        self._load, self._unload, self.max_loaded = load, unload, max(1, max_loaded)
        self._loaded: OrderedDict[Hashable, str] = OrderedDict()
        self._pending: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nirvana-variants")
        self.load_seconds: list[float] = []
        self.unloads = 0

    def loaded(self) -> list[Hashable]:
        """Loaded keys, least recently requested first."""
        with self._lock:
            return list(self._loaded)

    def request(self, key: Hashable, done: Done) -> bool:
        """Call ``done(name, None)`` once ``key``'s model is loaded, or ``done(None, error)``; True when it was
        loaded already (``done`` has run on this thread)."""
        with self._lock:
            name = self._loaded.get(key)
            if name is not None:
                self._loaded.move_to_end(key)
            else:
                future = self._pending.get(key)
                if future is None:
                    future = self._pending[key] = self._loader.submit(self._load_one, key)
        if name is not None:
            done(name, None)
            return True
        future.add_done_callback(lambda f: done(None, f.exception()) if f.exception() else done(f.result(), None))
        return False

    def _load_one(self, key: Hashable) -> str:
        start = time.perf_counter()
        try:
            name = self._load(key)
        except BaseException:
            with self._lock:
                self._pending.pop(key, None)
            raise
        self.load_seconds.append(time.perf_counter() - start)
        log.info("loaded %s as %s in %.2f s", key, name, self.load_seconds[-1])
        with self._lock:  # loaded and no longer pending in one step: nobody starts a second load of it
            self._pending.pop(key, None)
            self._loaded[key] = name
            evicted = []
            while len(self._loaded) > self.max_loaded:
                evicted.append(self._loaded.popitem(last=False)[1])
        if evicted:  # after this set's requesters are answered; Triton lets executions in flight on it finish
            self._loader.submit(self._evict, evicted)
        return name

    def _evict(self, names: list[str]) -> None:
        for name in names:
            try:
                self._unload(name)
                self.unloads += 1
            except Exception:
                log.exception("unloading %s failed", name)

    def close(self) -> None:
        self._loader.shutdown(wait=True)
