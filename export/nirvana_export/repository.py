"""Model repository builder: checkpoint → a complete Triton model repository for the `cpu` or `gpu` profile.

Every config.pbtxt is a `ModelConfig` protobuf built from `nirvana.specs` and rendered by protobuf's
`text_format` (never written by hand), so the Triton configs, the ONNX
files and the TensorRT profiles cannot drift apart. Profiles:

* `cpu`: the four sub-models are python-backend models running their ONNX file with onnxruntime (the
  tritonserver bundled in the pytriton wheel has no onnxruntime or TensorRT backend);
* `gpu`: `text_encoder`, `prompt_embedder`, `unet` and `vae_decoder` are `platform: "tensorrt_plan"` models
  (engines built from the same ONNX files on the GPU they will run on; NGC tritonserver image).

The BLS model `nirvana` is the same in both: python backend, its engine settings in `nirvana/engine.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from nirvana.specs import MODEL_NAMES, NIRVANA_MODEL, TRITON_DTYPES, ModelSpec, TensorSpec, nirvana_spec, triton_dims

PROFILES = ("cpu", "gpu")
SUBMODEL_PY = (
    '"""Triton python model: runs this version\'s model.onnx with onnxruntime (CPU profile)."""\n\n'
    "from nirvana.serving.onnx_model import TritonPythonModel  # noqa: F401\n"
)
NIRVANA_PY = (
    '"""Triton python model `nirvana`: the BLS orchestrator (glue in nirvana.serving.bls_model)."""\n\n'
    "from nirvana.serving.bls_model import TritonPythonModel  # noqa: F401\n"
)
MANIFEST = "repository_manifest.json"


class RepositoryError(ValueError):
    pass


def _tensor(message: mc.ModelInput | mc.ModelOutput, tensor: TensorSpec) -> None:
    message.name = tensor.name
    message.data_type = mc.DataType.Value(TRITON_DTYPES[tensor.dtype])
    message.dims.extend(triton_dims(tensor))


def _model_config(spec: ModelSpec) -> mc.ModelConfig:
    """Name, max_batch_size and every input/output of `spec` (optional inputs marked)."""
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    for tensor in spec.inputs:
        _tensor(config.input.add(), tensor)
        config.input[-1].optional = tensor.optional
    for tensor in spec.outputs:
        _tensor(config.output.add(), tensor)
    return config


def _render(config: mc.ModelConfig) -> str:
    # text_format leaves out fields at their default; say so where the default is a decision (batching).
    header = "# Generated from nirvana.specs by nirvana_export.repository: do not edit.\n"
    header += f"# max_batch_size: {config.max_batch_size}"
    header += " (explicit batch axis in dims)\n" if config.max_batch_size == 0 else "\n"
    return header + text_format.MessageToString(config, use_short_repeated_primitives=True)


def submodel_config(spec: ModelSpec, profile: str, instances: int = 1) -> str:
    """config.pbtxt of one sub-model for `profile`."""
    if profile not in PROFILES:
        raise RepositoryError(f"profile={profile!r}: choose one of {PROFILES}")
    config = _model_config(spec)
    if profile == "cpu":
        config.backend = "python"
        config.parameters["intra_op_threads"].string_value = "1"
    else:
        config.platform = "tensorrt_plan"
    kind = mc.ModelInstanceGroup.KIND_CPU if profile == "cpu" else mc.ModelInstanceGroup.KIND_GPU
    config.instance_group.add(count=instances, kind=kind)
    return _render(config)


def nirvana_config(image_size: tuple[int, int], max_queue_size: int = 64, queue_timeout_s: int = 300) -> str:
    """config.pbtxt of the BLS model `nirvana` (contract: `nirvana.specs.nirvana_spec`)."""
    config = _model_config(nirvana_spec(image_size))
    config.backend = "python"
    # One instance: a milvus-lite file admits one process, and Triton runs each instance in its own stub process.
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    # Overload is rejected at the queue, not absorbed as memory growth.
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = max_queue_size
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = queue_timeout_s * 1_000_000
    policy.allow_timeout_override = True
    config.parameters["engine_config"].string_value = "engine.json"
    return _render(config)


def render_configs(
    specs: dict[str, ModelSpec], image_size: tuple[int, int], profile: str, **nirvana_options: int
) -> dict[str, str]:
    """Relative path → text of every config.pbtxt and model.py of a repository (no weights).

    `nirvana_options`: max_queue_size, queue_timeout_s of the BLS model."""
    files = {f"{name}/config.pbtxt": submodel_config(specs[name], profile) for name in MODEL_NAMES}
    if profile == "cpu":
        files.update({f"{name}/1/model.py": SUBMODEL_PY for name in MODEL_NAMES})
    files[f"{NIRVANA_MODEL}/config.pbtxt"] = nirvana_config(image_size, **nirvana_options)
    files[f"{NIRVANA_MODEL}/1/model.py"] = NIRVANA_PY
    return files


def write_repository(
    checkpoint_dir: Path,
    out: Path,
    profile: str,
    engine_config: dict,
    *,
    max_batch: int = 2,
    fp16: bool = True,
    **nirvana_options: int,
) -> Path:
    """Export, check and lay out a full repository; reuses the previous export when the checkpoint is unchanged."""
    from nirvana.checkpoint import fingerprint_checkpoint, load_checkpoint_info
    from nirvana.specs import submodel_specs

    out = Path(out)
    fingerprint = fingerprint_checkpoint(checkpoint_dir)
    stamp = {"fingerprint": fingerprint, "profile": profile, "max_batch": max_batch, "fp16": fp16}
    manifest_path = out / MANIFEST
    fresh = not (manifest_path.exists() and json.loads(manifest_path.read_text()) == stamp)
    checkpoint = load_checkpoint_info(checkpoint_dir)
    specs = submodel_specs(checkpoint, max_batch=max_batch)
    if fresh:
        manifest_path.unlink(missing_ok=True)  # a failed export must never look like a finished one
        _export_weights(Path(checkpoint_dir), out, profile, specs, max_batch, fp16)
    for rel, text in render_configs(specs, checkpoint.image_size, profile, **nirvana_options).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    (out / "nirvana" / "engine.json").write_text(json.dumps(engine_config, indent=2, default=str) + "\n")
    manifest_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return out


def _export_weights(
    checkpoint_dir: Path, out: Path, profile: str, specs: dict[str, ModelSpec], max_batch: int, fp16: bool
) -> None:
    from nirvana_export.onnx_export import export_all

    staging = out / ".onnx"
    shutil.rmtree(staging, ignore_errors=True)
    paths = export_all(checkpoint_dir, staging, max_batch=max_batch)
    for name, onnx_file in paths.items():
        version_dir = out / name / "1"
        shutil.rmtree(version_dir, ignore_errors=True)
        version_dir.mkdir(parents=True)
        if profile == "cpu":
            for item in onnx_file.parent.iterdir():  # model.onnx and any external-data files beside it
                shutil.move(str(item), version_dir / item.name)
        else:
            from nirvana_export.tensorrt_build import build_engine

            build_engine(onnx_file, specs[name], version_dir / "model.plan", fp16=fp16)
    shutil.move(str(staging / "export_manifest.json"), out / "export_manifest.json")
    shutil.rmtree(staging, ignore_errors=True)


def sd15_specs(max_batch: int = 2) -> dict[str, ModelSpec]:
    """Specs of Stable Diffusion 1.5 at 512×512 (77×768 text, 4×64×64 latent), without needing its weights."""
    from nirvana.specs import prompt_embedder_spec, text_encoder_spec, unet_spec, vae_decoder_spec

    specs = (
        text_encoder_spec(77, 768, max_batch),
        prompt_embedder_spec(128, max_batch),
        unet_spec(4, (64, 64), 77, 768, max_batch),
        vae_decoder_spec(4, (64, 64), 8, max_batch),
    )
    return {spec.name: spec for spec in specs}


def reference_repository() -> dict[str, str]:
    """What `model_repository/` in the source tree holds: the SD 1.5 GPU profile's configs and model.py files."""
    return render_configs(sd15_specs(), (512, 512), "gpu")


if __name__ == "__main__":  # python -m nirvana_export.repository model_repository  (regenerates the reference)
    import sys

    root = Path(sys.argv[1])
    for rel, text in reference_repository().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        print(root / rel)
