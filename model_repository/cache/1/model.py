"""Triton python model `cache`: the one owner of the cache state (glue in nirvana.serving.cache_model)."""

from nirvana.serving.cache_model import TritonPythonModel  # noqa: F401
