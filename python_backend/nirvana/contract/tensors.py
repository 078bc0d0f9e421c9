"""The vocabulary of tensor contracts: a tensor's name, dtype and shape, a model's inputs, outputs and TensorRT
profile, and how shapes become ``config.pbtxt`` dims. :mod:`nirvana.contract.specs` says what the product's models
are in these terms."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["TRITON_DTYPES", "ModelSpec", "Shape", "SpecError", "TensorSpec", "needs_reshape", "triton_dims"]

# numpy dtype name ("string" for Triton's BYTES) → Triton config data_type.
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
    "string": "TYPE_STRING",
}

Shape = tuple[int, ...]


class SpecError(ValueError):
    """A spec or its arguments are inconsistent; the message names the model, tensor and values."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: ``dtype`` is a numpy dtype name (or ``"string"``); in ``shape`` ints are fixed, strings
    dynamic axes. ``optional`` inputs may be left out of a request (``optional: true`` in config.pbtxt)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_DTYPES:
            raise SpecError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {sorted(TRITON_DTYPES)}")

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Axis index → axis name for the dynamic axes (the form ``torch.onnx.export`` takes)."""
        return {i: dim for i, dim in enumerate(self.shape) if isinstance(dim, str)}

    def concrete(self, **axes: int) -> Shape:
        """The shape with each dynamic axis replaced by ``axes[name]``, e.g. ``concrete(batch=2)``."""
        missing = sorted(set(self.dynamic_axes.values()) - set(axes))
        if missing:
            raise SpecError(f"tensor {self.name!r} needs sizes for dynamic axes {missing}")
        return tuple(axes[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class ModelSpec:
    """A model's Triton name, tensors, TensorRT profile ``{input: (min, opt, max)}`` and max_batch_size.

    Models built as engines (the sub-models) need a profile covering every input; the python ``nirvana``
    orchestrator is no engine and has none (``profile=None``)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, tuple[Shape, Shape, Shape]] | None
    max_batch_size: int = 0

    def __post_init__(self) -> None:
        names = [t.name for t in self.inputs]
        if self.profile is not None and set(self.profile) != set(names):
            raise SpecError(f"model {self.name!r}: profile covers {sorted(self.profile)}, inputs are {names}")
        for tensor in self.inputs if self.profile is not None else ():
            lo, opt, hi = self.profile[tensor.name]
            for shape in (lo, opt, hi):
                fits = len(shape) == len(tensor.shape) and all(
                    isinstance(d, str) or d == s for d, s in zip(tensor.shape, shape, strict=False)
                )
                if not fits:
                    raise SpecError(f"model {self.name!r}: profile shape {shape} does not fit {tensor.shape}")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                raise SpecError(f"model {self.name!r}, input {tensor.name!r}: need min ≤ opt ≤ max, got {lo, opt, hi}")
        if self.max_batch_size < 0:
            raise SpecError(f"model {self.name!r}: max_batch_size must be ≥ 0, got {self.max_batch_size}")
        if self.max_batch_size > 0:
            self._check_batched()

    def _check_batched(self) -> None:
        """Under Triton batching every tensor leads with the "batch" axis and the profile stays within it."""
        for tensor in (*self.inputs, *self.outputs):
            if not tensor.shape or tensor.shape[0] != "batch":
                raise SpecError(f"model {self.name!r}: max_batch_size > 0 needs a leading 'batch' axis on {tensor}")
        for name, (_, _, hi) in (self.profile or {}).items():
            if hi[0] > self.max_batch_size:
                raise SpecError(
                    f"model {self.name!r}, input {name!r}: profile max batch {hi[0]} exceeds "
                    f"max_batch_size {self.max_batch_size}"
                )

    def tensor(self, name: str) -> TensorSpec:
        """The input or output tensor called ``name``."""
        for tensor in (*self.inputs, *self.outputs):
            if tensor.name == name:
                return tensor
        raise SpecError(f"model {self.name!r} has no tensor {name!r}")

    def input(self, name: str) -> TensorSpec:
        """The input tensor called ``name``."""
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise SpecError(f"model {self.name!r} has no input {name!r}; inputs: {[t.name for t in self.inputs]}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor: {axis: name}}`` over inputs and outputs, as ``torch.onnx.export(dynamic_axes=...)`` takes."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def to_dict(self) -> dict:
        """JSON-ready form (tuples become lists), for manifests."""
        return asdict(self)


def triton_dims(tensor: TensorSpec, batched: bool = False) -> list[int]:
    """``dims`` of a config.pbtxt input/output, dynamic axes as -1: the full shape under ``max_batch_size: 0``;
    with ``batched`` (``max_batch_size > 0``) the shape without its leading batch axis, which Triton prepends.

    A batched tensor of shape ``[batch]`` (the UNet's ``timestep``) has no dims left; Triton refuses empty dims,
    so it is ``[1]`` here and the config adds ``reshape: { shape: [] }`` (see :func:`needs_reshape`): clients send
    ``[rows, 1]``, the model receives ``[rows]``."""
    shape = tensor.shape[1:] if batched else tensor.shape
    return [-1 if isinstance(d, str) else int(d) for d in shape] or [1]


def needs_reshape(tensor: TensorSpec, batched: bool) -> bool:
    """Whether the config must reshape ``dims: [1]`` to ``[]``: a batched tensor whose only axis is the batch."""
    return batched and len(tensor.shape) == 1
