"""Predicted server time of a request, learnt from this replica's own executions (RAPID).

A request's server time is the stages before its denoising loop (text encoding, cache lookup: already measured
when the prediction is made, since K is only known after the lookup), the loop, and the stages after it (decode,
admission). The loop is steps × the cost of one UNet execution, and that cost depends on how many requests share
the execution (Triton's dynamic batcher merges the orchestrators' calls). So a replica learns:

* `StepTimes`: EWMA ms of one UNet call by the number of requests in their loops at the call (1, 2, …);
* the EWMA ms after the loop, for requests that admit latents and for those that do not.

Requests in flight are spread over the `nirvana` and `nirvana_stream` instances, each its own stub process, so
each request publishes its steps left on a `LoadBoard`: a small file-backed array shared by the server's stubs.
From the board and `StepTimes` a request's loop is forecast by running the shared schedule forward (requests
finishing one by one shrink the batch); new arrivals are not foreseen, which is most of the remaining error.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LoadBoard", "ServiceTimes", "StepTimes", "forecast_ms"]

SLOTS = 64  # requests in their loops at once, per server: far above any instance count
_PID, _STEPS = 0, 1
BOARD_ENV = "NIRVANA_LOAD_BOARD"
LEVEL_ALPHA = 0.05  # the recent load level remembers about the last 20 steps


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class LoadBoard:
    """Steps left of every request in its denoising loop, shared by the processes of one server.

    One row per request (owner pid, steps left). A request claims a free row under an exclusive `flock` (rows of
    dead processes are free too, so a crashed stub leaves nothing behind), then only it writes that row; readers
    read without locking. ``LoadBoard.for_server()`` names the file after the tritonserver process that started the
    stub (its parent), unless ``$NIRVANA_LOAD_BOARD`` names one.
    """

    def __init__(self, path: Path, remove_on_close: bool = False) -> None:
        self.path, self._remove = Path(path), remove_on_close
        with open(self.path, "a+b") as f:  # create once; every process sees the same zeroed rows
            fcntl.flock(f, fcntl.LOCK_EX)
            if os.fstat(f.fileno()).st_size < SLOTS * 2 * 8:
                f.truncate(SLOTS * 2 * 8)
            fcntl.flock(f, fcntl.LOCK_UN)
        self._file = open(self.path, "r+b")  # noqa: SIM115  (held for flock; closed in close())
        self._rows = np.memmap(self._file, dtype=np.int64, mode="r+", shape=(SLOTS, 2))
        self._lock = threading.Lock()  # flock does not exclude threads sharing one open file

    @classmethod
    def for_server(cls) -> LoadBoard:
        named = os.environ.get(BOARD_ENV)
        if named:
            return cls(Path(named))
        shm = Path("/dev/shm")
        root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
        return cls(root / f"nirvana-load-{os.getppid()}")

    @classmethod
    def private(cls) -> LoadBoard:
        """A board of this process alone (the in-process engine), removed at close."""
        fd, name = tempfile.mkstemp(prefix="nirvana-load-")
        os.close(fd)
        return cls(Path(name), remove_on_close=True)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._file, fcntl.LOCK_UN)

    def claim(self, steps: int) -> int | None:
        """A row for a request with `steps` to run; None when every row is taken (it then goes untracked)."""
        with self._exclusive():
            for row in range(SLOTS):
                pid = int(self._rows[row, _PID])
                if pid == 0 or not _alive(pid):
                    self._rows[row] = (os.getpid(), steps)
                    return row
        return None

    def update(self, row: int, steps_left: int) -> None:
        self._rows[row, _STEPS] = steps_left

    def release(self, row: int) -> None:
        with self._exclusive():
            self._rows[row] = (0, 0)

    def steps_left(self, exclude: int | None = None) -> list[int]:
        """Steps left of every tracked request but row `exclude` (rows of dead processes are skipped)."""
        rows = np.array(self._rows)  # one consistent-enough copy
        return [
            int(steps)
            for row, (pid, steps) in enumerate(rows)
            if row != exclude and pid != 0 and steps > 0 and _alive(int(pid))
        ]

    def close(self) -> None:
        """Idempotent (a pipeline may be closed twice)."""
        if self._file.closed:
            return
        del self._rows
        self._file.close()
        if self._remove:
            self.path.unlink(missing_ok=True)


class StepTimes:
    """EWMA ms of one UNet call by how many requests shared it; not thread-safe alone (`ServiceTimes` locks)."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.by_sharing: dict[int, float] = {}

    def observe(self, sharing: int, ms: float) -> None:
        old = self.by_sharing.get(sharing)
        self.by_sharing[sharing] = ms if old is None else old + self.alpha * (ms - old)

    def ms(self, sharing: float) -> float | None:
        """Learnt ms at `sharing`; between learnt levels linear, past the last one along the last two's slope (with
        one level: proportional to the requests, as when every row costs the same), below the first one flat."""
        known = sorted(self.by_sharing)
        if not known:
            return None
        if sharing in self.by_sharing:
            return self.by_sharing[sharing]
        if sharing < known[0]:
            return self.by_sharing[known[0]]
        above = [level for level in known if level > sharing]
        if above:
            lo, hi = max(level for level in known if level < sharing), above[0]
            a, b = self.by_sharing[lo], self.by_sharing[hi]
            return a + (b - a) * (sharing - lo) / (hi - lo)
        last = known[-1]
        if len(known) == 1:
            return self.by_sharing[last] * sharing / last
        prev = known[-2]
        slope = max((self.by_sharing[last] - self.by_sharing[prev]) / (last - prev), 0.0)
        return self.by_sharing[last] + slope * (sharing - last)


def forecast_ms(own: int, others: Sequence[int], step_ms: Callable[[float], float], level: float = 1.0) -> float:
    """Ms until a request with `own` steps left finishes its loop beside requests with `others` steps left, all
    stepping together; `step_ms(n)` is one call's cost with n requests sharing it.

    As the others finish, the batch shrinks, but not below `level`: the replica's recent mean of requests sharing a
    step, standing for the arrivals that replace them (1 predicts no arrivals; under steady load the recent level
    is what a request sees on average)."""
    finish_points = sorted({s for s in others if 0 < s < own} | {own})
    total, done = 0.0, 0
    for point in finish_points:
        sharing = 1 + sum(1 for s in others if s > done)
        total += (point - done) * step_ms(max(sharing, level))
        done = point
    return total


class ServiceTimes:
    """One replica's cost model and its share of the load board: `track()` each request's loop (its UNet calls teach
    the step costs), then `learn_after()` the time from the loop's end to the answer."""

    def __init__(self, board: LoadBoard, alpha: float = 0.2) -> None:
        self.board, self.alpha = board, alpha
        self.steps = StepTimes(alpha)
        self.level = 1.0  # EWMA of requests sharing each step this process timed: the replica's recent load
        self.after_ms: dict[bool, float] = {}  # admits latents? → EWMA ms from the loop's end to the answer
        self._lock = threading.Lock()

    def _step_ms(self, sharing: float) -> float:
        return self.steps.ms(sharing) or 0.0

    def track(self, steps: int) -> _Tracked:
        return _Tracked(self, steps)

    def drain_ms(self) -> float | None:
        """Predicted ms until every request now in its loop has finished it (no new arrivals); None before any
        step was timed."""
        with self._lock:
            if not self.steps.by_sharing:
                return None
            left = sorted(self.board.steps_left(), reverse=True)  # what is held: no arrivals foreseen
            return forecast_ms(left[0], left[1:], self._step_ms) if left else 0.0

    def step_levels(self) -> dict[int, float]:
        with self._lock:
            return dict(self.steps.by_sharing)

    def learn_after(self, admits: bool, ms: float) -> None:
        with self._lock:
            old = self.after_ms.get(admits)
            self.after_ms[admits] = ms if old is None else old + self.alpha * (ms - old)


class _Tracked:
    """One request's loop on the board: `predict()` its total, `models()` times its UNet calls; a context manager
    (the row is released on exit, whatever happened)."""

    def __init__(self, service: ServiceTimes, steps: int) -> None:
        self.service, self.left = service, steps
        self.row = service.board.claim(steps) if steps > 0 else None
        self.loop_end: float | None = None

    def __enter__(self) -> _Tracked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop_end = time.perf_counter()
        if self.row is not None:
            self.service.board.release(self.row)
            self.row = None

    def predict(self, elapsed_ms: float, admits: bool) -> float | None:
        """Predicted total server ms: `elapsed_ms` so far + the forecast loop + the learnt time after it; None
        until the replica has timed a step and finished a request (of either kind: admitting or not)."""
        service = self.service
        with service._lock:
            after = service.after_ms.get(admits, service.after_ms.get(not admits))
            if after is None or (self.left > 0 and not service.steps.by_sharing):
                return None
            others = service.board.steps_left(exclude=self.row)
            return elapsed_ms + forecast_ms(self.left, others, service._step_ms, service.level) + after

    def models(self, models: Any) -> _TimedUNet:
        return _TimedUNet(models, self)

    def stepped(self, sharing: int, ms: float) -> None:
        self.left -= 1
        if self.row is not None:
            self.service.board.update(self.row, max(self.left, 0))
        with self.service._lock:
            self.service.steps.observe(sharing, ms)
            self.service.level += LEVEL_ALPHA * (sharing - self.service.level)

    def sharing(self) -> int:
        return 1 + len(self.service.board.steps_left(exclude=self.row))


class _TimedUNet:
    """`SubModels` whose `unet` calls are timed into the cost model, by the requests in their loops at the call."""

    def __init__(self, models: Any, tracked: _Tracked) -> None:
        self._models, self._tracked = models, tracked

    def unet(self, *args: Any, **kwargs: Any) -> Any:
        sharing = self._tracked.sharing()
        start = time.perf_counter()
        out = self._models.unet(*args, **kwargs)
        self._tracked.stepped(sharing, (time.perf_counter() - start) * 1e3)
        return out

    def observed(self, sharing: int, ms: float) -> None:
        """A step of this request's loop run elsewhere (the step scheduler): learnt as if timed here."""
        self._tracked.stepped(sharing, ms)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._models, name)
