"""The step batcher: every request in its loop advances in every UNet execution, and each gets its own answer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from nirvana.denoise import denoise, initial_latent, make_scheduler
from nirvana.runtime.torch_runtime import TorchSubModels
from nirvana.step_batcher import BatchedUNet, StepBatcher


def _rowwise(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A UNet stand-in whose rows do not mix: what a row gets back tells which row it was."""
    return inputs["sample"] * 2 + inputs["timestep"].reshape(-1, 1, 1, 1)


def _loop(batcher: StepBatcher, index: int, steps: int, errors: list, pause_s: float = 0.0, start=None) -> None:
    with batcher.loop():
        if start is not None:  # every loop is in before any hands in rows: lockstep from the first step
            start.wait(timeout=30)
        x = torch.full((1, 4, 2, 2), float(index))
        for step in range(steps):
            rows = {"sample": torch.cat([x, x + 0.5]), "timestep": torch.tensor([float(step)] * 2)}
            rows["encoder_hidden_states"] = torch.zeros(2, 3, 5)
            if not torch.equal(batcher.unet(rows), _rowwise(rows)):
                errors.append((index, step))
            time.sleep(pause_s)


def _run_all(batcher: StepBatcher, steps: list[int], pause_s: float = 0.0, together: bool = False) -> list:
    errors: list = []
    start = threading.Barrier(len(steps)) if together else None
    threads = [
        threading.Thread(target=_loop, args=(batcher, i, n, errors, pause_s, start)) for i, n in enumerate(steps)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_every_loop_in_flight_shares_each_execution_and_gets_its_own_rows() -> None:
    executions: list[int] = []
    # a long join wait: this tests what is merged, not how long a loop may dawdle (busy CI cores stall threads)
    batcher = StepBatcher(lambda i: executions.append(len(i["sample"])) or _rowwise(i), max_rows=16, join_wait_s=2.0)
    assert _run_all(batcher, [20] * 8, pause_s=0.0005, together=True) == []
    stats = batcher.stats
    assert stats.requests == 160 and stats.rows == 320 and sum(executions) == 320
    assert executions == [16] * 20  # 8 loops in their loops: every execution carries all of them
    assert (stats.complete_iterations, stats.loop_requests) == (20, 160)  # and the counters say so
    assert batcher.active == 0


def test_loops_join_and_leave_at_step_boundaries_without_waiting_for_each_other() -> None:
    batcher = StepBatcher(_rowwise, max_rows=16, join_wait_s=2.0)
    assert _run_all(batcher, [3, 10, 25, 40], together=True) == []
    # 4 loops for 3 steps, 3 up to step 10, 2 up to 25, the longest alone for its last 15: one iteration a step
    assert batcher.stats.rows_histogram == {8: 3, 6: 7, 4: 15, 2: 15} and batcher.stats.iterations == 40


def test_a_newcomer_waits_for_the_running_cohort_instead_of_splitting_it() -> None:
    """A loop that hands in while an iteration runs joins the next one together with that iteration's requests,
    not alone: its wait counts from the end of the running iteration, not from its hand-in."""

    def slow(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        time.sleep(0.4)  # longer than join_wait_s: the newcomer's hand-in is "old" when the iteration ends
        return _rowwise(inputs)

    batcher = StepBatcher(slow, max_rows=16, join_wait_s=0.2)
    errors: list = []
    first = [threading.Thread(target=_loop, args=(batcher, i, 5, errors)) for i in range(2)]
    for thread in first:
        thread.start()
    time.sleep(0.1)  # inside the first iteration
    late = threading.Thread(target=_loop, args=(batcher, 2, 5, errors))
    late.start()
    for thread in [*first, late]:
        thread.join(timeout=30)
    assert errors == []
    assert batcher.stats.rows_histogram.get(6, 0) >= 3, batcher.stats.rows_histogram  # the three together


def test_a_loop_slow_to_hand_in_is_waited_for_at_most_join_wait() -> None:
    batcher = StepBatcher(_rowwise, max_rows=16, join_wait_s=0.01)
    slow_done = threading.Event()

    def slow() -> None:
        with batcher.loop():
            time.sleep(2.0)  # in its loop, not handing in rows (e.g. restoring a scheduler state)
        slow_done.set()

    threading.Thread(target=slow).start()
    time.sleep(0.05)
    start = time.perf_counter()
    assert _run_all(batcher, [10]) == []
    assert time.perf_counter() - start < 1.5 and not slow_done.is_set()  # 10 steps × ≤ 10 ms, not 2 s
    # each iteration left the slow loop behind, and the counters say so: 2 in their loops, 1 carried
    assert (batcher.stats.complete_iterations, batcher.stats.loop_requests) == (0, 2 * batcher.stats.iterations)


def test_max_rows_splits_an_iteration_and_a_failed_execution_reaches_only_its_requests() -> None:
    calls: list[int] = []

    def run(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(len(inputs["sample"]))
        if (inputs["sample"] < 0).any():
            raise RuntimeError("bad rows")
        return _rowwise(inputs)

    batcher = StepBatcher(run, max_rows=4)
    assert _run_all(batcher, [5] * 4) == [] and max(calls) <= 4
    good = {"sample": torch.ones(2, 4, 2, 2), "timestep": torch.zeros(2), "encoder_hidden_states": torch.zeros(2, 3, 5)}
    with batcher.loop(), pytest.raises(RuntimeError, match="bad rows"):
        batcher.unet({**good, "sample": -good["sample"]})
    with batcher.loop():
        assert torch.equal(batcher.unet(good), _rowwise(good))  # the batcher goes on


def test_concurrent_loops_through_the_batcher_equal_their_single_runs(tiny_checkpoint) -> None:
    """Real loops (scheduler step, guidance) on the tiny torch UNet: merged executions change no request's latent
    beyond float noise of a different batch size (torch CPU conv: 3e-5 after 8 steps)."""
    models = TorchSubModels(tiny_checkpoint)
    text = torch.randn(2, tiny_checkpoint.text_max_length, tiny_checkpoint.text_hidden_size)

    def run_one(seed: int, unet) -> torch.Tensor:
        scheduler = make_scheduler("ddim", tiny_checkpoint.scheduler_config)
        generator = torch.Generator().manual_seed(seed)
        latent = initial_latent((1, 4, 16, 16), generator, scheduler, num_steps=8)
        return denoise(unet, scheduler, 8, text, 7.5, generator=generator, latent=latent).latent

    alone = [run_one(seed, models) for seed in range(4)]
    batcher = StepBatcher(lambda i: models.unet(i["sample"], i["timestep"], i["encoder_hidden_states"]), 16)
    merged: dict[int, torch.Tensor] = {}

    def loop(seed: int) -> None:
        with batcher.loop():
            merged[seed] = run_one(seed, BatchedUNet(batcher))

    threads = [threading.Thread(target=loop, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert batcher.stats.rows_per_execution > 2  # they did share executions
    for seed in range(4):
        np.testing.assert_allclose(merged[seed].numpy(), alone[seed].numpy(), atol=1e-4)  # measured 3e-5


def test_each_lora_sets_rows_run_on_its_own_model_once_per_iteration() -> None:
    """Requests of the same set share one execution of the set's model; other sets and the base UNet get their own,
    in the same iteration; each request's rows come back from its own model."""
    calls: list[tuple[str | None, int]] = []
    offsets = {None: 0.0, "unet_lora_a": 100.0, "unet_lora_b": 200.0}

    def by_model(model: str | None, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append((model, len(inputs["sample"])))
        return _rowwise(inputs) + offsets[model]

    batcher = StepBatcher(lambda inputs: by_model(None, inputs), max_rows=16, join_wait_s=2.0, run_named=by_model)
    models = [None, "unet_lora_a", "unet_lora_a", "unet_lora_b"]
    start, errors = threading.Barrier(len(models)), []

    def loop(index: int) -> None:
        with batcher.loop():
            start.wait(timeout=30)
            rows = {"sample": torch.full((2, 4, 2, 2), float(index)), "timestep": torch.zeros(2)}
            rows["encoder_hidden_states"] = torch.zeros(2, 3, 5)
            for _ in range(5):
                if not torch.equal(batcher.unet(rows, models[index]), _rowwise(rows) + offsets[models[index]]):
                    errors.append(index)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert batcher.stats.iterations == 5 and batcher.stats.executions == 15  # three models, five steps
    assert sorted(set(calls), key=str) == sorted({(None, 2), ("unet_lora_a", 4), ("unet_lora_b", 2)}, key=str)


def test_a_batcher_without_named_models_refuses_one() -> None:
    batcher = StepBatcher(_rowwise, max_rows=4)
    rows = {"sample": torch.ones(1, 4, 2, 2), "timestep": torch.zeros(1), "encoder_hidden_states": torch.zeros(1, 3, 5)}
    with batcher.loop(), pytest.raises(ValueError, match="unet_model='unet_lora_x'"):
        batcher.unet(rows, "unet_lora_x")
