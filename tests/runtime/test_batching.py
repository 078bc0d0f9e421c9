"""nirvana.runtime.batching: N requests → one run → N answers; merged UNet rows equal the rows run alone."""

from __future__ import annotations

import numpy as np
import pytest

from nirvana.checkpoint import Checkpoint
from nirvana.contract.specs import submodel_specs
from nirvana.runtime.batching import BatchInputError, row_count, run_merged
from nirvana.runtime.onnx_runtime import OnnxModel, onnx_path
from nirvana_export.onnx_export import export_submodel

# Max abs difference allowed between a request's noise prediction in a merged batch and alone (onnxruntime 1.32,
# fp32, CPU). Measured 0.0 (bit-identical) on the tiny UNet, 6 rows vs 2 (printed with -s); the bound leaves room
# for CPUs whose kernels block the batch dimension differently.
MERGE_ATOL = 1e-5


class _Recorder:
    """A runner that doubles every input row and counts its calls and batch sizes."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(row_count(feeds))
        if np.any(feeds["x"] < 0):
            raise ValueError("negative input")
        return {"y": feeds["x"] * 2, "rows": np.arange(len(feeds["x"]))}


def _req(rows: int, start: float = 0.0, width: int = 3) -> dict[str, np.ndarray]:
    x = np.arange(rows * width, dtype=np.float32).reshape(rows, width) + start
    return {"x": x, "t": np.full(rows, start, np.float32)}


def test_compatible_requests_share_one_run_and_get_their_own_rows_back() -> None:
    run = _Recorder()
    requests = [_req(2, 0), _req(2, 100), _req(1, 200)]
    answers = run_merged(run, requests)
    assert run.calls == [5]
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], request["x"] * 2)
    assert [a["rows"].tolist() for a in answers] == [[0, 1], [2, 3], [4]]  # split in arrival order


def test_a_single_request_runs_without_copies() -> None:
    seen = []
    request = _req(2)
    run_merged(lambda feeds: seen.append(feeds) or {"y": feeds["x"]}, [request])
    assert seen[0]["x"] is request["x"]


def test_requests_of_different_shapes_or_dtypes_run_in_separate_groups_in_order() -> None:
    run = _Recorder()
    requests = [_req(2, 0), _req(2, 0, width=4), _req(1, 5), {"x": np.ones((1, 3)), "t": np.ones(1, np.float32)}]
    answers = run_merged(run, requests)
    assert sorted(run.calls) == [1, 2, 3]  # float32 width 3 (rows 2+1), width 4, float64
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], request["x"] * 2)


def test_an_inconsistent_request_gets_its_own_error_and_the_others_are_answered() -> None:
    run = _Recorder()
    bad_rows = {"x": np.ones((2, 3), np.float32), "t": np.ones(3, np.float32)}
    scalar = {"x": np.ones((2, 3), np.float32), "t": np.float32(1.0)}
    answers = run_merged(run, [_req(2), bad_rows, _req(1, 7), scalar])
    assert isinstance(answers[1], BatchInputError) and "disagree on the batch size" in str(answers[1])
    assert isinstance(answers[3], BatchInputError) and "leading batch axis" in str(answers[3])
    np.testing.assert_array_equal(answers[2]["y"], _req(1, 7)["x"] * 2)
    assert run.calls == [3]


def test_a_failing_merged_run_is_retried_per_request_so_only_the_culprit_fails() -> None:
    run = _Recorder()
    answers = run_merged(run, [_req(2, 0), _req(1, -50), _req(2, 9)])
    assert run.calls == [5, 2, 1, 2]  # merged, then each alone
    assert isinstance(answers[1], ValueError)
    np.testing.assert_array_equal(answers[2]["y"], _req(2, 9)["x"] * 2)


def test_outputs_without_the_batch_rows_are_not_split_but_each_request_still_answered() -> None:
    calls = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(row_count(feeds))
        return {"y": np.zeros(row_count(feeds) + 1)}  # one row too many: no way to tell whose rows are whose

    answers = run_merged(run, [_req(2), _req(1)])
    assert calls == [3, 2, 1]
    assert [a["y"].shape for a in answers] == [(3,), (2,)]  # alone, the model's output is the request's answer


@pytest.fixture(scope="module")
def unet_onnx(tiny_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    out = tmp_path_factory.mktemp("unet_onnx")
    spec = submodel_specs(tiny_checkpoint)["unet"]
    return OnnxModel(export_submodel(tiny_checkpoint, spec, onnx_path(out, "unet")))


def unet_pair(seed: int, timestep: float, seq_len: int = 77, hidden: int = 32) -> dict[str, np.ndarray]:
    """One request's CFG pair as the BLS model sends it: the same latent twice, [uncond, cond] text, one t."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    return {
        "sample": np.concatenate([latent, latent]),
        "timestep": np.full(2, timestep, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, seq_len, hidden)).astype(np.float32),
    }


def test_merged_unet_rows_equal_each_request_alone(unet_onnx: OnnxModel) -> None:
    # Three requests at different steps of their own schedules, with different latents and prompts.
    requests = [unet_pair(1, 981.0), unet_pair(2, 501.0), unet_pair(3, 21.0)]
    alone = [unet_onnx.run(r)["noise_pred"] for r in requests]
    calls = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(row_count(feeds))
        return unet_onnx.run(feeds)

    merged = run_merged(run, requests)
    assert calls == [6]
    diffs = [float(np.abs(m["noise_pred"] - a).max()) for m, a in zip(merged, alone, strict=True)]
    print(f"\nmerged (6 rows) vs alone (2 rows), max abs diff per request: {diffs}")
    assert max(diffs) <= MERGE_ATOL
    # The requests really differ: a mix-up of rows would not pass the bound above.
    assert float(np.abs(alone[0] - alone[1]).max()) > 100 * MERGE_ATOL
