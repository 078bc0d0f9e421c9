"""A model's `config.pbtxt` from its spec: the `ModelConfig` protobuf (`tritonclient`'s `model_config_pb2`) with every
input and output of the spec, rendered by protobuf's `text_format` under a header that says where it came from. Shared
by `nirvana_export.repository` (the sub-models and orchestrators) and `nirvana_export.stream_config`."""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from nirvana.contract.tensors import TRITON_DTYPES, ModelSpec, TensorSpec, needs_reshape, triton_dims
from nirvana.serving.internal import SECRET_PARAMETER

__all__ = ["SECRET_FILE", "RepositoryError", "model_config", "render"]

SECRET_FILE = "internal.secret"  # at the repository's root, beside the model folders (Triton ignores files there)


class RepositoryError(ValueError):
    pass


def _tensor(message: mc.ModelInput | mc.ModelOutput, tensor: TensorSpec, batched: bool) -> None:
    message.name = tensor.name
    message.data_type = mc.DataType.Value(TRITON_DTYPES[tensor.dtype])
    message.dims.extend(triton_dims(tensor, batched))
    if needs_reshape(tensor, batched):
        message.reshape.SetInParent()  # dims [1] → [] : the model sees [rows]


def model_config(spec: ModelSpec) -> mc.ModelConfig:
    """Name, max_batch_size and every input/output of `spec` (optional inputs marked; dims without the batch axis
    when max_batch_size > 0)."""
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    batched = spec.max_batch_size > 0
    for tensor in spec.inputs:
        _tensor(config.input.add(), tensor, batched)
        config.input[-1].optional = tensor.optional
    for tensor in spec.outputs:
        _tensor(config.output.add(), tensor, batched)
    return config


def render(config: mc.ModelConfig) -> str:
    if config.backend == "python":  # every python model checks or sends the internal credential (nirvana.security)
        config.parameters[SECRET_PARAMETER].string_value = f"../{SECRET_FILE}"
    # text_format leaves out fields at their default; say so where the default is a decision (batching).
    header = "# Generated from nirvana.contract.specs by nirvana_export.repository: do not edit.\n"
    header += f"# max_batch_size: {config.max_batch_size}"
    header += (
        " (explicit batch axis in dims)\n" if config.max_batch_size == 0 else " (Triton prepends the batch axis)\n"
    )
    return header + text_format.MessageToString(config, use_short_repeated_primitives=True)
