"""Triton python model `step_scheduler`: every request's denoising loop (glue in nirvana.serving.scheduler_model)."""

from nirvana.serving.scheduler_model import TritonPythonModel  # noqa: F401
