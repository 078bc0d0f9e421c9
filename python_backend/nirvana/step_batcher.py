"""One UNet execution per iteration for every request in its denoising loop (continuous batching at step boundaries).

Each request runs its own loop (`nirvana.denoise.denoise`: its scheduler, its guidance, its captures) on its own
thread; its UNet calls come here. An iteration runs when every request that is in its loop has handed in its rows:
their rows go through the UNet together and each gets its slice back. A request that arrives while an iteration runs
is in the next one; one that leaves (finished, cancelled, failed) stops being waited for. So a request never waits
for another to finish, and at steady state every execution carries every active request.

A request that is in its loop but slow to hand in its rows (between steps it applies guidance and its scheduler step,
about a millisecond) is waited for at most `join_wait_s`; then the iteration runs without it and it joins the next.
Rows of requests whose inputs cannot be stacked (other trailing shapes or input names) run as separate executions,
and so do the rows of requests for another UNet model (a LoRA set's, `unet_model`) or with a ControlNet: one
execution per model, and per (ControlNet, UNet model) pair, whose rows also carry each request's control image and
scale.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nirvana.handoff import JobControl

__all__ = ["IterationStats", "StepBatcher"]

Inputs = dict[str, torch.Tensor]
Runner = Callable[[Inputs], torch.Tensor]
NamedRunner = Callable[[Hashable, Inputs], torch.Tensor]


@dataclass
class IterationStats:
    """What the batcher did, for /metrics and the benchmarks (cumulative)."""

    iterations: int = 0
    executions: int = 0
    rows: int = 0
    requests: int = 0  # request-steps served
    execute_ms: float = 0.0  # inside the UNet runner
    join_wait_ms: float = 0.0  # summed over request-steps: hand-in to the start of its execution
    rows_histogram: dict[int, int] = field(default_factory=dict)  # rows per execution → executions
    # Iterations that carried every request then in its loop, and the requests in their loops summed over iterations:
    # what tells a batcher that leaves requests behind from requests that are elsewhere (encode, decode, the network).
    complete_iterations: int = 0
    loop_requests: int = 0

    @property
    def rows_per_execution(self) -> float:
        return self.rows / self.executions if self.executions else 0.0


@dataclass(eq=False)  # identity: slots hold tensors
class _Slot:
    inputs: Inputs
    rows: int
    handed_in: float
    model: Hashable | None = None  # None: the base UNet (`run`); else what `run_named` runs the rows on
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class StepBatcher:
    """`with batcher.loop(): … batcher.unet(inputs) …` from each request's thread; `run(inputs)` executes the UNet
    on stacked rows (``sample [R, C, h, w]``, ``timestep [R]``, ``encoder_hidden_states [R, L, D]``, …) and returns
    ``[R, C, h, w]``; ``run_named(model, inputs)`` does the same on another UNet model (a LoRA set's name, or a
    (ControlNet, UNet model) pair). At most
    `max_rows` rows go into one execution."""

    def __init__(
        self, run: Runner, max_rows: int, join_wait_s: float = 0.02, run_named: NamedRunner | None = None
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: must be ≥ 1")
        self._run, self.max_rows, self.join_wait_s = run, max_rows, join_wait_s
        self._run_named = run_named
        self._cond = threading.Condition()
        self._active = 0
        self._pending: list[_Slot] = []
        self._running = False
        self._free_since = time.perf_counter()  # when the last iteration ended
        self._taken_of = (0, 0)  # the running iteration: (its requests, requests in their loops when it was taken)
        self.stats = IterationStats()

    @property
    def active(self) -> int:
        return self._active

    @contextlib.contextmanager
    def loop(self) -> Iterator[None]:
        """One request's denoising loop: counted as active (waited for) from entry to exit, whatever ends it."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()  # the others may have been waiting for this request's rows

    def unet(self, inputs: Inputs, model: Hashable | None = None) -> torch.Tensor:
        """This request's rows through the UNet (``model``: a named one, `run_named`), in the next iteration; blocks
        until its slice is back."""
        if model is not None and self._run_named is None:
            raise ValueError(f"unet_model={model!r}: this batcher runs only its own UNet")
        slot = _Slot(inputs, int(inputs["sample"].shape[0]), time.perf_counter(), model)
        with self._cond:
            self._pending.append(slot)
            self._cond.notify_all()
        while True:
            with self._cond:
                batch = [] if slot.done else self._take_if_ready()
                if not slot.done and not batch:
                    self._cond.wait(timeout=self.join_wait_s / 4)
                    continue
            if not batch:
                break
            self._execute(batch)  # whoever finds the iteration ready runs it, for every request in it
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    def _take_if_ready(self) -> list[_Slot]:
        """Under the lock: the slots of the next iteration when it may start now (this thread then runs it)."""
        if self._running or not self._pending:
            return []
        rows = sum(s.rows for s in self._pending)
        # Counted from the later of hand-in and the end of the last iteration: rows handed in while one ran must not
        # start the next at once, before the requests of the one that ran have taken their scheduler step.
        waited = time.perf_counter() - max(self._pending[0].handed_in, self._free_since)
        if len(self._pending) < self._active and rows < self.max_rows and waited < self.join_wait_s:
            return []
        batch, taken = [], 0
        for pending in self._pending:  # oldest first, up to max_rows (a request's rows are never split)
            if batch and taken + pending.rows > self.max_rows:
                break
            batch.append(pending)
            taken += pending.rows
        self._pending = self._pending[len(batch) :]
        self._running = True
        self._taken_of = (len(batch), self._active)
        return batch

    def _execute(self, batch: list[_Slot]) -> None:
        start = time.perf_counter()
        groups = _groups(batch)
        try:
            for group in groups:  # a failing group answers its own requests with the error (`_run_group`)
                self._run_group(group)
        finally:
            elapsed = (time.perf_counter() - start) * 1e3
            with self._cond:
                self._running, self._free_since = False, time.perf_counter()
                stats = self.stats
                stats.iterations += 1
                taken, in_loops = self._taken_of
                stats.complete_iterations += taken >= in_loops
                stats.loop_requests += in_loops
                stats.executions += len(groups)
                stats.requests += len(batch)
                stats.execute_ms += elapsed
                stats.join_wait_ms += sum((start - s.handed_in) * 1e3 for s in batch)
                for group in groups:
                    rows = sum(s.rows for s in group)
                    stats.rows += rows
                    stats.rows_histogram[rows] = stats.rows_histogram.get(rows, 0) + 1
                for slot in batch:
                    slot.done = True
                self._cond.notify_all()

    def _run_group(self, group: list[_Slot]) -> None:
        model = group[0].model
        run = self._run if model is None else functools.partial(self._run_named, model)  # type: ignore[arg-type]
        try:
            if len(group) == 1:
                outputs = [run(group[0].inputs)]
            else:
                stacked = {name: torch.cat([s.inputs[name] for s in group]) for name in group[0].inputs}
                outputs = list(torch.split(run(stacked), [s.rows for s in group]))
        except Exception as err:  # each request of the group hears it; the batcher goes on
            for slot in group:
                slot.error = err
            return
        for slot, output in zip(group, outputs, strict=True):
            slot.result = output


def _groups(batch: list[_Slot]) -> list[list[_Slot]]:
    """Slots whose inputs stack, for the same model: the same names, dtypes and trailing shapes."""
    groups: dict[tuple, list[_Slot]] = {}
    for slot in batch:
        key = (slot.model, *sorted((n, str(t.dtype), tuple(t.shape[1:])) for n, t in slot.inputs.items()))
        groups.setdefault(key, []).append(slot)
    return list(groups.values())


class BatchedUNet:
    """The `unet` of `nirvana.submodels.SubModels` for one request's loop, its calls merged across loops by
    `batcher`. ``step_ms`` collects, per call, (requests in the iteration, ms from hand-in to result): what the
    orchestrator's cost model learns from (`nirvana.service_time`). ``model``: the UNet model of the request's LoRA
    set (None: the base UNet). ``control``: the request's ControlNet (`nirvana.handoff.JobControl`): its rows go to
    ``(control.model, model)`` with the control image and scale beside each row."""

    def __init__(
        self,
        batcher: StepBatcher,
        step_ms: list[tuple[int, float]] | None = None,
        model: str | None = None,
        control: JobControl | None = None,
    ) -> None:
        self._batcher, self.step_ms, self.control = batcher, step_ms, control
        self.model: Hashable | None = model if control is None else (control.model, model)

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        rows = sample.shape[0]
        inputs = {
            "sample": sample.to(torch.float32),
            "timestep": timestep.reshape(-1).to(torch.float32).expand(rows),  # one per row, float (DDIM's are int)
            "encoder_hidden_states": encoder_hidden_states.to(torch.float32),
        }
        inputs |= {name: value.to(torch.float32) for name, value in (added_cond or {}).items()}
        if self.control is not None:
            inputs["controlnet_cond"] = self.control.image.to(torch.float32).expand(rows, -1, -1, -1)
            inputs["conditioning_scale"] = torch.full((rows,), self.control.scale)
        start, sharing = time.perf_counter(), self._batcher.active
        noise = self._batcher.unet(inputs, self.model)
        if self.step_ms is not None:
            self.step_ms.append((sharing, (time.perf_counter() - start) * 1e3))
        return noise
