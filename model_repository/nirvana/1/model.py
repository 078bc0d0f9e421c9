"""Triton python model `nirvana`: the BLS orchestrator (glue in nirvana.serving.bls_model)."""

from nirvana.serving.bls_model import TritonPythonModel  # noqa: F401
