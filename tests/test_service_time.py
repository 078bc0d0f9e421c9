"""Predicted server time: step costs by sharing, the loop forecast, the cross-process load board, and the
prediction a request reports in its timings."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch

from nirvana.service_time import LoadBoard, ServiceTimes, StepTimes, forecast_ms


def test_step_times_interpolate_and_extrapolate() -> None:
    steps = StepTimes(alpha=0.5)
    assert steps.ms(1) is None
    steps.observe(2, 20.0)
    assert steps.ms(1) == 20.0  # below the first level: flat
    assert steps.ms(4) == 40.0  # one level: proportional to the requests
    steps.observe(4, 30.0)
    assert steps.ms(3) == 25.0  # linear between learnt levels
    assert steps.ms(6) == 40.0  # past the last along the last slope
    steps.observe(4, 50.0)  # EWMA: halfway with alpha 0.5
    assert steps.ms(4) == 40.0


def test_forecast_shrinks_the_batch_as_others_finish() -> None:
    cost = {1: 10.0, 2: 15.0, 3: 18.0}.__getitem__
    assert forecast_ms(10, [], cost) == 100.0
    # 4 steps with one beside it, then 6 alone
    assert forecast_ms(10, [4], cost) == 4 * 15.0 + 6 * 10.0
    # a longer neighbour shares every one of its steps
    assert forecast_ms(5, [30], cost) == 5 * 15.0
    assert forecast_ms(6, [2, 4, 0], cost) == 2 * 18.0 + 2 * 15.0 + 2 * 10.0
    # under steady load finished neighbours are replaced: the batch does not shrink below the recent level
    assert forecast_ms(10, [4], cost, level=2) == 10 * 15.0
    assert forecast_ms(10, [], cost, level=3) == 10 * 18.0


def _hold_a_row(path: str, ready, release) -> None:
    board = LoadBoard(path)
    row = board.claim(7)
    ready.put(row)
    release.wait(10)
    board.close()


def test_board_is_shared_across_processes_and_frees_rows_of_dead_ones(tmp_path) -> None:
    path = str(tmp_path / "board")
    board = LoadBoard(path)
    context = multiprocessing.get_context("spawn")
    ready, release = context.Queue(), context.Event()
    child = context.Process(target=_hold_a_row, args=(path, ready, release))
    child.start()
    try:
        child_row = ready.get(timeout=60)
        mine = board.claim(3)
        assert mine != child_row
        assert sorted(board.steps_left()) == [3, 7]
        assert board.steps_left(exclude=mine) == [7]
    finally:
        child.kill()  # dies holding its row
        child.join()
    assert board.steps_left() == [3]  # a dead process's request is not counted
    claimed = [board.claim(1) for _ in range(64)]
    assert child_row in claimed  # its row is free again
    assert claimed.count(None) == 1  # all 64 rows but mine
    board.release(mine)
    board.close()


class SleepyUNet:
    """A UNet that takes `ms` per call whatever its input: the forecast should land on it."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def unet(self, sample, *args, **kwargs):
        time.sleep(self.ms / 1e3)
        return torch.zeros_like(sample)


def test_prediction_follows_steps_and_sharing(tmp_path) -> None:
    service = ServiceTimes(LoadBoard(tmp_path / "board"), alpha=1.0)
    with service.track(5) as loop:
        assert loop.predict(1.0, admits=False) is None  # nothing learnt yet
        timed = loop.models(SleepyUNet(5.0))
        for _ in range(5):
            timed.unet(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, 3, 4))
    service.learn_after(False, 2.0)
    alone = service.step_levels()[1]
    assert alone >= 5.0
    with service.track(10) as loop:
        assert loop.predict(3.0, admits=False) == pytest.approx(3.0 + 10 * alone + 2.0)
        assert loop.predict(3.0, admits=True) == pytest.approx(3.0 + 10 * alone + 2.0)  # the other path's figure
        with service.track(4) as other:  # a neighbour with 4 steps: unlearnt level 2 is proportional
            assert other.row is not None
            assert loop.predict(0.0, admits=False) == pytest.approx(4 * 2 * alone + 6 * alone + 2.0)
            assert service.drain_ms() == pytest.approx(4 * 2 * alone + 6 * alone)
    assert service.drain_ms() == 0.0  # rows released on exit


def test_concurrent_loops_learn_the_shared_level(tmp_path) -> None:
    service = ServiceTimes(LoadBoard(tmp_path / "board"))
    barrier = threading.Barrier(2)

    def run() -> None:
        with service.track(6) as loop:
            barrier.wait(10)
            timed = loop.models(SleepyUNet(3.0))
            for _ in range(6):
                timed.unet(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 3, 4))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 2 in service.step_levels()  # calls made while both were in their loops


def test_each_answer_reports_its_predicted_server_time(tiny_checkpoint, tmp_path) -> None:
    from nirvana.config import load_config
    from nirvana.pipeline import Pipeline

    config = load_config(
        {
            "checkpoint": str(tiny_checkpoint.path),
            "default_steps": 20,
            "embedder": "minilm",
            "cache": {"dir": str(tmp_path / "cache"), "predictor": {"enabled": False}},
        }
    )
    pipe = Pipeline(config, checkpoint=tiny_checkpoint)
    try:
        first = pipe.generate("a red fox in the snow, photograph", seed=1)
        assert "predicted_total_ms" not in first.timings_ms  # nothing learnt before the first answer
        miss = pipe.generate("a lighthouse on a cliff at dusk, oil painting", seed=2)
        hit = pipe.generate("a red fox in the snow, photograph", seed=1)
        assert not miss.cache_hit and hit.cache_hit and hit.skipped_steps > 0
        # fewer steps to run, less time predicted: K is known when the prediction is made
        assert hit.timings_ms["predicted_total_ms"] < miss.timings_ms["predicted_total_ms"]
        for result in (miss, hit):
            predicted, actual = result.timings_ms["predicted_total_ms"], result.timings_ms["total_ms"]
            assert abs(predicted - actual) / actual < 0.5, result.timings_ms
    finally:
        pipe.close()
    assert not pipe.service.board.path.exists()  # the in-process board goes with the pipeline
