"""Decoupled BLS responses are let go of only after the python backend stub's own cleanup of them.

The python backend stub of the pytriton wheel (Triton 2.51, python_backend r24.10) keeps every decoupled BLS
response iterator in a map too. When the last response arrives, the iterator queues its cleanup; the stub's C++
stub-to-parent thread then erases it from the map, holding no GIL. If Python has already dropped the iterator and
its responses, that erase frees them: each output tensor's numpy array is released without the GIL while Python
threads run, which corrupts the interpreter's allocator (python_backend fixed `~PbTensor` in r25.01, #390; the
wheel's stub predates it). A `nirvana` stub died of it under CPU load (SIGSEGV in pymalloc_alloc, then "Stub
process 'nirvana_0_3' is not healthy"). So a caller keeps the iterator until the stub's queue has passed its
cleanup: `request.is_cancelled()` of the model's own request is a round trip through that same FIFO queue.

Measured with a refcount probe (4 orchestrators, 8 clients, 2-core CPU under load): without this, the stub's
thread still held a response's arrays when Python let go on 35–45% of generations (released 0–27 ms later); with
it, on none of 1,231. The stub shipped with Triton 2.51 is the newest the pytriton wheel has, so an upgrade is not
the fix here; an image on Triton ≥ 25.01 does not need this, and it costs one stub round trip per BLS call there.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

__all__ = ["release_decoupled", "serving_request"]

_serving = threading.local()
_HELD_S = 30.0  # without a request to flush the queue with: held this long, then dropped by Python
_held: deque[tuple[float, Any]] = deque()
_held_lock = threading.Lock()


@contextlib.contextmanager
def serving_request(request: Any) -> Iterator[None]:
    """Within this block, this thread serves `request` (the model's own, from Triton): `release_decoupled` flushes
    the stub's queue with it."""
    previous = getattr(_serving, "request", None)
    _serving.request = request
    try:
        yield
    finally:
        _serving.request = previous


def release_decoupled(responses: Any) -> None:
    """Call once done with a decoupled BLS response iterator, before the last reference to it or to its responses
    goes: returns when the stub has erased it from its own map, so that Python, holding the GIL, frees it. Without
    a serving request (or once that request is cancelled: the stub answers that from a cache, not through the queue)
    the iterator is held `_HELD_S` seconds instead; expired ones are dropped by a later call (the hold is as large
    as 30 s of BLS calls). An iterator left before its final response is never erased by the stub (it stays in the
    stub's map), so for it this only costs the round trip. At shutdown `is_cancelled()` may answer without the
    round trip; nothing is served then."""
    request = getattr(_serving, "request", None)
    flushed = False
    if request is not None:
        try:
            flushed = not request.is_cancelled()
        except Exception:  # no round trip made: hold it instead
            flushed = False
    now = time.monotonic()
    expired = []
    with _held_lock:
        if not flushed:
            _held.append((now + _HELD_S, responses))
        while _held and _held[0][0] <= now:
            expired.append(_held.popleft()[1])
    expired.clear()  # here, with the GIL
