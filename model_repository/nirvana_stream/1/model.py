"""Triton python model `nirvana_stream`: decoupled, progress and previews (glue in nirvana.serving.stream_model)."""

from nirvana.serving.stream_model import TritonPythonModel  # noqa: F401
