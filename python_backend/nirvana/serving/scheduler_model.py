"""Triton glue of the decoupled `step_scheduler` model: every request's denoising loop, one UNet execution per step
for all of them (`nirvana.step_batcher`).

The orchestrators (`nirvana`, `nirvana_stream`) hand a request's loop over once (`nirvana.handoff`) and wait for its
final latent. Here each loop runs `nirvana.denoise.denoise` on a thread of its own, exactly as in process (same
scheduler step, same guidance, same captures), with its UNet calls merged by the batcher. The UNet runs inside this
process (`unet_runner: session`: the repository's ONNX file by onnxruntime, or the checkpoint's torch module) or as
the `unet` model through BLS (`bls`: what a TensorRT plan needs). A job for a LoRA set names the set's UNet model
(`unet_model`, loaded by the `adapters` model): the rows of every request with that set go to that model through BLS
in one execution per iteration, beside the base UNet's. A `cancel` request naming a job stops it at its next step
boundary (the BLS caller cannot cancel a decoupled request in this python backend).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nirvana.cache.wire import bytes_array
from nirvana.checkpoint import load_checkpoint_info
from nirvana.config import load_config
from nirvana.denoise import denoise, make_scheduler
from nirvana.families import DIT
from nirvana.handoff import DenoiseJob, HandoffError, decode_job, encode_final, encode_step
from nirvana.progress import Cancelled
from nirvana.runtime.bls import use_credential
from nirvana.security.credential import read_secret
from nirvana.serving.internal import InternalGate, secret_path
from nirvana.serving.metrics import Families
from nirvana.serving.params import engine_config_path, model_parameters
from nirvana.serving.scheduler_control import ControlRunner
from nirvana.step_batcher import BatchedUNet, StepBatcher

log = logging.getLogger("nirvana.scheduler")
MAX_JOBS = 64  # loops run at once; more wait for a worker
# Loops held (running or waiting for a worker): Triton queues nothing for this model (no dynamic batcher, see
# `nirvana_export.repository._unqueued`), so the bound is here; one more is refused at once.
MAX_HELD = 256
COUNTERS = (  # /metrics: nirvana_scheduler_<name>
    ("iterations_total", "Step iterations run"),
    ("rows_total", "UNet rows run by the step scheduler"),
    ("unet_executions_total", "UNet executions it ran"),
    ("iteration_ms_total", "Milliseconds spent in iterations"),
    ("join_wait_ms_total", "Milliseconds request-steps waited for their iteration to start"),
    ("complete_iterations_total", "Iterations that carried every request in its loop"),
    ("loop_requests_total", "Requests in their loop at each iteration, summed"),
)


def _tensor(pb: Any, name: str, value: bytes) -> Any:
    return pb.Tensor(name, bytes_array(value))


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = model_parameters(json.loads(args["model_config"]))
        self.gate = InternalGate(pb_utils, args, params)
        use_credential(read_secret(secret_path(args, params)))  # its BLS calls reach gated models (LoRA sets' UNets)
        config = load_config(path=engine_config_path(args, params))
        self.checkpoint = load_checkpoint_info(config.checkpoint)
        repository = Path(args["model_repository"]).parent
        run = unet_runner(params.get("unet_runner", "session"), repository, self.checkpoint, params, pb_utils)
        max_rows = int(params.get("max_rows", "16"))
        control = ControlRunner(pb_utils, self.checkpoint, params.get("residual_memory", "cpu"))
        self.batcher = StepBatcher(run, max_rows, run_named=functools.partial(run_named, pb_utils, control))
        self.workers = ThreadPoolExecutor(max_workers=MAX_JOBS, thread_name_prefix="nirvana-loop")
        self._cancelled: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._metrics(pb_utils)
        log.info("step scheduler ready (unet_runner=%s)", params.get("unet_runner", "session"))

    def _metrics(self, pb: Any) -> None:
        make = self._families = Families(pb)  # a family must outlive its metrics
        self._active = make.gauge("nirvana_scheduler_active_requests", "Requests in their denoising loop")
        # Each mirrors the `IterationStats` field of the same position in `_publish`.
        self._counters = tuple(make.counter(f"nirvana_scheduler_{name}", text) for name, text in COUNTERS)
        self._published: tuple = (0,) * len(COUNTERS)

    def _publish(self) -> None:
        s = self.batcher.stats
        with self._lock:  # jobs end on several worker threads: the snapshot too, or an older one could win
            now = (s.iterations, s.rows, s.executions, s.execute_ms, s.join_wait_ms)
            now += (s.complete_iterations, s.loop_requests)
            before, self._published = self._published, now
            for metric, new, old in zip(self._counters, now, before, strict=True):
                if new > old:
                    metric.increment(new - old)
            self._active.set(self.batcher.active)

    def execute(self, requests: list) -> None:
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            refusal = self.gate.refusal(request)
            if refusal is not None:
                sender.send(refusal, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            try:
                header = json.loads(bytes(pb.get_input_tensor_by_name(request, "JOB").as_numpy().reshape(-1)[0]))
                if header.get("op") == "cancel":
                    self._cancel(str(header.get("id")))
                    sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                tensors = pb.get_input_tensor_by_name(request, "TENSORS")
                job = decode_job(header, b"" if tensors is None else bytes(tensors.as_numpy().reshape(-1)[0]))
            except (HandoffError, ValueError, KeyError, TypeError, AttributeError) as err:
                error = pb.TritonError(f"JOB: {err}", pb.TritonError.INVALID_ARG)
                sender.send(pb.InferenceResponse(error=error), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            refusal = self._hold(job.job_id)
            if refusal is not None:
                sender.send(pb.InferenceResponse(error=refusal), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.workers.submit(self._run, job, sender, self._cancelled[job.job_id])
        return None

    def _hold(self, job_id: str) -> Any:
        """Register the job (its cancel event), or the error that refuses it: the bound, or an id already held."""
        pb = self.pb
        with self._lock:
            if len(self._cancelled) >= MAX_HELD:
                return pb.TritonError(f"step scheduler full: {MAX_HELD} loops held", pb.TritonError.UNAVAILABLE)
            if job_id in self._cancelled:
                return pb.TritonError(f"JOB: id {job_id[:40]!r} is already held", pb.TritonError.INVALID_ARG)
            self._cancelled[job_id] = threading.Event()
        return None

    def _cancel(self, job_id: str) -> None:
        with self._lock:
            event = self._cancelled.get(job_id)
        if event is not None:
            event.set()

    def _run(self, job: DenoiseJob, sender: Any, cancelled: threading.Event) -> None:
        pb = self.pb
        step_ms: list[tuple[int, float]] = []
        try:
            result = self._denoise(job, sender, cancelled, step_ms)
            event, tensors = encode_final(result, step_ms)
            response = pb.InferenceResponse([_tensor(pb, "EVENT", event), _tensor(pb, "TENSORS", tensors)])
        except Cancelled:
            response = pb.InferenceResponse(error=pb.TritonError("cancelled", pb.TritonError.CANCELLED))
        except Exception as err:
            log.exception("denoising job failed")
            response = pb.InferenceResponse(error=pb.TritonError(f"denoising failed: {type(err).__name__}: {err}"))
        finally:
            with self._lock:
                self._cancelled.pop(job.job_id, None)
        try:
            sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as err:  # the caller is gone
            log.info("final answer of job %s not delivered: %s", job.job_id, err)
        try:
            self._publish()
        except Exception:  # a metrics failure must not end the worker
            log.exception("scheduler metrics update failed")

    def _denoise(self, job: DenoiseJob, sender: Any, cancelled: threading.Event, step_ms: list) -> Any:
        pb = self.pb
        scheduler = make_scheduler(job.scheduler, self.checkpoint.scheduler_config)
        generator = torch.Generator()
        generator.set_state(job.generator_state)

        def on_step(i: int, x: torch.Tensor) -> None:
            if cancelled.is_set():
                raise Cancelled(f"job {job.job_id} cancelled by its orchestrator")
            if job.events:
                event, blob = encode_step(i, x)
                sender.send(pb.InferenceResponse([_tensor(pb, "EVENT", event), _tensor(pb, "TENSORS", blob)]))

        unet = BatchedUNet(self.batcher, step_ms, job.unet_model, job.control)
        with self.batcher.loop():
            return denoise(
                unet,
                scheduler,
                job.steps,
                job.embeddings,
                job.guidance,
                generator=generator,
                latent=job.latent,
                start=job.start,
                capture_at=job.capture_at,
                on_step=on_step,
                added_cond=job.added_cond,
            )

    def finalize(self) -> None:
        with self._lock:
            for event in self._cancelled.values():
                event.set()
        self.workers.shutdown(wait=False, cancel_futures=True)


def run_named(pb: Any, control: ControlRunner, model: Hashable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batcher's rows for a model other than its own UNet: a LoRA set's UNet model by name, or a (ControlNet,
    UNet model) pair."""
    if isinstance(model, tuple):
        return control(*model, inputs)
    return bls_unet(pb, str(model), inputs)


def bls_unet(pb: Any, model: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``{input: tensor [R, …]}`` → noise ``[R, C, h, w]`` by the Triton model ``model`` (a batched UNet config)."""
    from nirvana.runtime.bls import bls_infer_torch

    feeds = {**inputs, "timestep": inputs["timestep"].reshape(-1, 1)}  # the batched config's [rows, 1]
    return bls_infer_torch(pb, model, feeds, ["noise_pred"])["noise_pred"].float()


def unet_runner(kind: str, repository: Path, checkpoint: Any, params: dict[str, str], pb: Any) -> Any:
    """``{input: tensor [R, …]} → noise [R, C, h, w]`` float32 on the CPU, for the batcher.

    "session": in this process, no hop per iteration: the repository's `unet/1/model.onnx` by onnxruntime (cpu
    profile) or the checkpoint's torch UNet (torch profile; on CUDA replayed from a CUDA graph per row count unless
    the `cuda_graphs` parameter is "false", `nirvana.runtime.cuda_graphs`); "bls": the `unet` model of the
    repository (a TensorRT plan cannot be run here)."""
    if kind == "bls":
        return functools.partial(bls_unet, pb, "unet")
    if kind != "session":
        raise ValueError(f"unet_runner={kind!r}: choose session or bls")
    onnx = repository / "unet" / "1" / "model.onnx"
    if onnx.is_file():
        from nirvana.runtime.onnx_runtime import OnnxModel

        model = OnnxModel(onnx, num_threads=int(params.get("intra_op_threads", "1")))

        def onnx_unet(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            out = model.run({name: np.ascontiguousarray(t.numpy()) for name, t in inputs.items()})
            return torch.from_numpy(out["noise_pred"])

        return onnx_unet
    from nirvana.runtime.torch_runtime import component_runner

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # fp16 on a GPU; bf16 for SD 3 and FLUX, trained and run in bf16 (FLUX overflows fp16)
    half = torch.bfloat16 if checkpoint.family in DIT else torch.float16
    dtype = half if device == "cuda" else torch.float32
    runner = torch.inference_mode()(component_runner("unet", checkpoint.path, device, dtype))
    if device == "cuda" and params.get("cuda_graphs", "true") == "true":  # eager fp16 steps are launch-bound
        from nirvana.runtime.cuda_graphs import GraphedRunner

        runner = GraphedRunner(runner)

    def torch_unet(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: t.to(device) for name, t in inputs.items()}
        feeds["timestep"] = feeds["timestep"].reshape(-1, 1)  # component_runner takes Triton's [rows, 1]
        return runner(feeds)["noise_pred"].to("cpu", torch.float32)

    return torch_unet
