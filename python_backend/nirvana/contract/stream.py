"""Tensor contract of ``nirvana_stream``: the ``nirvana`` model's, made decoupled (docs/serving.md, "Progress and
previews").

Same inputs as ``nirvana`` plus ``PREVIEW_EVERY``. One request gets several responses, in this order:

1. ``cache``: the cache has answered (hit, K, similarity, reason) or was skipped (``CACHE_MODE``);
2. ``progress``: one after every denoising step run, N − K of them; every ``PREVIEW_EVERY``-th of them (counted over
   the steps this request runs; 0 or absent = never) also carries ``PREVIEW``;
3. ``final``: the ``nirvana`` model's five outputs, with Triton's final flag.

Every response carries ``EVENT``, one JSON object whose ``"event"`` is ``cache``, ``progress`` or ``final``; a
response carries only the outputs its event lists (Triton allows a decoupled model's responses to differ).
"""

from __future__ import annotations

from nirvana.contract.specs import ModelSpec, TensorSpec, nirvana_spec

__all__ = ["MAX_PREVIEW_EVERY", "STREAM_MODEL", "nirvana_stream_spec"]

STREAM_MODEL = "nirvana_stream"
MAX_PREVIEW_EVERY = 1000


def nirvana_stream_spec(image_size: tuple[int, int], latent_size: tuple[int, int]) -> ModelSpec:
    """``nirvana_spec`` + input ``PREVIEW_EVERY`` int32 [1] (optional, 0 … MAX_PREVIEW_EVERY) + outputs ``EVENT``
    string [1] (JSON, on every response) and ``PREVIEW`` uint8 ``[h, w, 3]`` (the latent's size: 1/8 of the
    image's for SD; on preview responses only)."""
    base = nirvana_spec(image_size)
    h, w = latent_size
    inputs = (*base.inputs, TensorSpec("PREVIEW_EVERY", "int32", (1,), optional=True))
    outputs = (*base.outputs, TensorSpec("EVENT", "string", (1,)), TensorSpec("PREVIEW", "uint8", (h, w, 3)))
    return ModelSpec(STREAM_MODEL, inputs, outputs, profile=None)
