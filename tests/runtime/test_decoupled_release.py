"""A decoupled BLS response iterator is let go of only after the stub's own cleanup, so that Python (holding the GIL)
frees its responses, never the stub's GIL-less thread (`nirvana.runtime.decoupled`)."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from nirvana.runtime import decoupled
from nirvana.runtime.decoupled import release_decoupled, serving_request


class Responses:  # stands for the stub's response iterator and what it holds
    pass


class ServedRequest:
    """The model's own request: `is_cancelled()` is the round trip through the stub's queue."""

    def __init__(self, cancelled: bool = False, fails: bool = False) -> None:
        self.calls, self.cancelled, self.fails = 0, cancelled, fails

    def is_cancelled(self) -> bool:
        self.calls += 1
        if self.fails:
            raise RuntimeError("stub gone")
        return self.cancelled


@pytest.fixture(autouse=True)
def _empty_hold():
    decoupled._held.clear()
    yield
    decoupled._held.clear()


def _released(request: ServedRequest | None) -> weakref.ref:
    responses = Responses()
    ref = weakref.ref(responses)
    if request is None:
        release_decoupled(responses)
    else:
        with serving_request(request):
            release_decoupled(responses)
    del responses
    gc.collect()
    return ref


def test_while_serving_a_request_the_stub_queue_is_flushed_and_nothing_is_held() -> None:
    request = ServedRequest()
    ref = _released(request)
    assert request.calls == 1  # one round trip through the stub's queue
    assert ref() is None and not decoupled._held  # the caller's frame let go of it, with the GIL


@pytest.mark.parametrize("request_", [None, ServedRequest(cancelled=True), ServedRequest(fails=True)])
def test_without_a_flush_the_responses_are_held_until_they_expire(request_, monkeypatch) -> None:
    """No serving request, a cancelled one (the stub answers that from a cache, not its queue) or a failed call:
    no flush happened, so the responses are kept, and dropped by a later call once expired."""
    monkeypatch.setattr(decoupled, "_HELD_S", 0.05)
    ref = _released(request_)
    assert ref() is not None  # held: the stub's thread may still be erasing its own reference
    time.sleep(0.1)
    release_decoupled(Responses())
    gc.collect()
    assert ref() is None and len(decoupled._held) == 1  # the expired one dropped, the new one held


def test_serving_request_restores_the_previous_one_when_nested() -> None:
    outer, inner = ServedRequest(), ServedRequest()
    with serving_request(outer):
        with serving_request(inner):
            release_decoupled(Responses())
        release_decoupled(Responses())
    assert (outer.calls, inner.calls) == (1, 1)
    release_decoupled(Responses())  # outside any request: held, no call
    assert (outer.calls, inner.calls) == (1, 1) and len(decoupled._held) == 1
