"""Which adapter sets have a UNet model loaded, and loading the others one at a time in the background (LRU), bounded.

SwiftDiffusion's rule: a request for a loaded set never waits for another set's load. ``request`` answers a loaded
set at once, on the caller's thread; a set not loaded is handed to one loader thread, and every request for it
waits on the same load (one load per set, however many ask). What a stream of new sets can cost is bounded: at most
``max_pending`` distinct sets wait for or undergo a load (a request for one more is refused at once with
:class:`PoolBusy`), and a requester waits at most ``wait_s`` (then :class:`LoadTimeout`; the load goes on, and the
set serves the next request). When more than ``max_loaded`` sets are loaded, one is unloaded: the least recently
requested of those asked for only once since they loaded (a stream of one-off scales evicts itself, not the sets
in steady use), else the least recently requested. The loading and unloading are injected: in the server they go
through :class:`LoaderModel` (`nirvana.serving.adapter_model`), in the tests plain functions.

:class:`LoaderModel` is the Triton python model that calls ``pb_utils.load_model``/``unload_model`` for the
``adapters`` model. The python backend runs those calls holding the stub's GIL and its message lock while the
server's backend thread of that instance loads synchronously, so in the ``adapters`` stub itself every answer —
a loaded set's too — waited for the load, even run from the loader thread (measured with two clients sending new
scales, 8 requests in flight, tiny model, 2 CPU cores: loaded sets waited up to 2,637 ms for their answer and their
p99 grew 3.6×). In a stub of its own, a load freezes only this helper (same run: at most 21 ms, p99 unchanged).
It uses the in-process API (the C API, not the network endpoint), so the server's public model-control protocol
can stay closed (`--grpc-restricted-protocol=model-repository:...`); it answers only requests that carry the
``adapters`` instance's one-time token, and loads only UNet set models with the model.py files below.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["LoadTimeout", "LoaderModel", "PoolBusy", "VariantPool"]

log = logging.getLogger(__name__)
Done = Callable[[str | None, Exception | None], None]

# The model.py of each kind of set model LoaderModel may load: nothing else, whatever a request says.
VARIANT_FILES = {
    "onnx": (
        '"""Triton python model: the base UNet ONNX file with one LoRA set\'s fused weights (nirvana adapters)."""\n\n'
        "from nirvana.serving.onnx_model import TritonPythonModel  # noqa: F401\n"
    ),
    "torch": (
        '"""Triton python model: the checkpoint\'s UNet with a LoRA set fused in (nirvana adapters, torch profile)."""'
        "\n\nfrom nirvana.serving.torch_model import TritonPythonModel  # noqa: F401\n"
    ),
}
LOADER_PY = (
    '"""Triton python model: loads and unloads LoRA-set UNet models for the adapters model (nirvana)."""\n\n'
    "from nirvana.addons.variant_pool import LoaderModel as TritonPythonModel  # noqa: F401\n"
)
TOKEN_PARAMETER = "nirvana_loader_token"  # the BLS request parameter holding the token
TOKEN_DIGEST = "loader_token_sha256"  # the config parameter holding its digest (the config API may show it)
VARIANT_NAME = re.compile(r"^[a-z_]{1,32}_lora_[0-9a-f]{16}$")  # `nirvana.addons.lora_onnx.variant_name`


class PoolBusy(RuntimeError):
    """Too many distinct sets are waiting for a load: this one is refused now (the client may retry)."""


class LoadTimeout(RuntimeError):
    """A requester waited ``wait_s`` and its set is still loading (the load goes on)."""


class _Once:
    """``done`` called at most once: the load's answer and the deadline race, and the first wins."""

    def __init__(self, done: Done) -> None:
        self._done, self._lock, self.called = done, threading.Lock(), False

    def __call__(self, name: str | None, err: Exception | None) -> None:
        with self._lock:
            if self.called:
                return
            self.called = True
        self._done(name, err)


class _Deadlines:
    """One thread that calls each callback at its time (one thread for every waiter, not one timer each)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq, self._cond, self._closed = itertools.count(), threading.Condition(), False
        self._thread = threading.Thread(target=self._run, name="nirvana-variants-deadlines", daemon=True)
        self._thread.start()

    def add(self, seconds: float, callback: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._seq), callback))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._closed:
                    return
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception:
                log.exception("a load deadline's callback failed")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)


class VariantPool:
    """``load(key) -> model name`` and ``unload(name)`` behind an LRU of at most ``max_loaded`` loaded keys, with at
    most ``max_pending`` keys waiting for a load and requesters waiting at most ``wait_s`` (None: no limit)."""

    def __init__(
        self,
        load: Callable[[Hashable], str],
        unload: Callable[[str], None],
        max_loaded: int,
        max_pending: int = 4,
        wait_s: float | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._load, self._unload, self.max_loaded = load, unload, max(1, max_loaded)
        self.max_pending, self.wait_s, self._on_change = max(1, max_pending), wait_s, on_change
        self._loaded: OrderedDict[Hashable, str] = OrderedDict()
        self._uses: dict[Hashable, int] = {}  # requests answered by each loaded key (eviction prefers one-offs)
        self._pending: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nirvana-variants")
        self._deadlines = _Deadlines() if wait_s is not None else None
        self.load_seconds: list[float] = []
        self.unloads = self.refused = self.timeouts = 0

    def loaded(self) -> list[Hashable]:
        """Loaded keys, least recently requested first."""
        with self._lock:
            return list(self._loaded)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def submit(self, task: Callable[[], object]) -> Future:
        """Run ``task`` on the loader thread, in order with the loads (e.g. preparing what loads need)."""
        return self._loader.submit(task)

    def request(self, key: Hashable, done: Done) -> bool:
        """Call ``done(name, None)`` once ``key``'s model is loaded, or ``done(None, error)`` (PoolBusy at once when
        ``max_pending`` other keys wait, LoadTimeout after ``wait_s``); True when ``done`` has run on this thread."""
        refused = None
        with self._lock:
            name = self._loaded.get(key)
            if name is not None:
                self._loaded.move_to_end(key)
                self._uses[key] += 1
            else:
                future = self._pending.get(key)
                if future is None and len(self._pending) >= self.max_pending:
                    self.refused += 1
                    refused = PoolBusy(
                        f"{len(self._pending)} adapter sets are waiting to load (the limit, "
                        f"adapters.max_pending_loads={self.max_pending}): retry later or use a loaded set"
                    )
                elif future is None:
                    future = self._pending[key] = self._loader.submit(self._load_one, key)
        if name is not None or refused is not None:
            done(name, refused)
            return True
        once = _Once(done)
        if self._deadlines is not None:
            self._deadlines.add(self.wait_s, lambda: self._expire(key, once))  # type: ignore[arg-type]
        future.add_done_callback(lambda f: once(None, f.exception()) if f.exception() else once(f.result(), None))
        return once.called

    def _expire(self, key: Hashable, once: _Once) -> None:
        if once.called:
            return
        self.timeouts += 1
        once(None, LoadTimeout(f"still loading after {self.wait_s:g} s (adapters.load_wait_s): retry later"))

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
            self._loaded[key], self._uses[key] = name, 1
            evicted = []
            while len(self._loaded) > self.max_loaded:
                victim = self._victim(key)
                evicted.append(self._loaded.pop(victim))
                del self._uses[victim]
        if evicted:  # after this set's requesters are answered; Triton lets executions in flight on it finish
            self._loader.submit(self._evict, evicted)
        return name

    def _victim(self, newest: Hashable) -> Hashable:
        """The least recently requested key asked for once since it loaded, else the least recently requested;
        never ``newest`` (its requesters are about to be answered with it)."""
        candidates = [key for key in self._loaded if key != newest]
        once = [key for key in candidates if self._uses[key] <= 1]
        return (once or candidates)[0]

    def _evict(self, names: list[str]) -> None:
        for name in names:
            try:
                self._unload(name)
                self.unloads += 1
            except Exception:
                log.exception("unloading %s failed", name)
        if self._on_change is not None:
            self._on_change()

    def close(self) -> None:
        self._loader.shutdown(wait=True)
        if self._deadlines is not None:
            self._deadlines.close()


def request_token(pb: Any, request: Any) -> str:
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        return ""
    value = parameters.get(TOKEN_PARAMETER, "")
    return value if isinstance(value, str) else ""


def _text(pb: Any, request: Any, name: str, limit: int = 1 << 20) -> str:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"{name} is missing")
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1 or len(value[0]) > limit:
        raise ValueError(f"{name} must be one string of at most {limit} bytes")
    return bytes(value[0]).decode("utf-8")


class LoaderModel:
    """Triton python model (one instance) that loads or unloads one set model per request, for the ``adapters``
    model only: a request without its token is refused before anything else is read."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self._digest = parameters.get(TOKEN_DIGEST, {}).get("string_value", "")

    def execute(self, requests: list) -> list:
        return [self._handle(request) for request in requests]

    def _handle(self, request: Any) -> Any:
        pb = self.pb
        token = request_token(pb, request)
        digest = hashlib.sha256(token.encode()).hexdigest()
        if not self._digest or not token or not hmac.compare_digest(digest, self._digest):
            return pb.InferenceResponse(error=pb.TritonError("permission denied", pb.TritonError.UNAVAILABLE))
        try:
            action, name = _text(pb, request, "ACTION", 16), _text(pb, request, "NAME", 128)
            if not VARIANT_NAME.match(name):
                raise ValueError(f"NAME={name!r} is not a LoRA set model's name")
            if action == "unload":
                pb.unload_model(model_name=name)
            elif action == "load":
                kind, config = _text(pb, request, "KIND", 16), json.loads(_text(pb, request, "CONFIG"))
                if kind not in VARIANT_FILES or config.get("name") != name or config.get("backend") != "python":
                    raise ValueError(f"KIND={kind!r} or CONFIG does not describe the python set model {name!r}")
                pb.load_model(
                    model_name=name, config=json.dumps(config), files={"file:1/model.py": VARIANT_FILES[kind].encode()}
                )
            else:
                raise ValueError(f"ACTION={action!r}: load or unload")
        except Exception as err:  # a failed load is the adapters model's to report; this model stays up
            return pb.InferenceResponse(error=pb.TritonError(f"{type(err).__name__}: {err}", pb.TritonError.INTERNAL))
        import numpy as np

        return pb.InferenceResponse(output_tensors=[pb.Tensor("MODEL", np.array([name.encode()], dtype=np.object_))])
