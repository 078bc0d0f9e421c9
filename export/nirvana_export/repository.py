"""Model repository builder: checkpoint → a complete Triton model repository for the `cpu`, `gpu` or `torch` profile.

Every config.pbtxt is a `ModelConfig` protobuf built from `nirvana.contract.specs` and rendered by protobuf's
`text_format` (never written by hand), so the Triton configs, the ONNX
files and the TensorRT profiles cannot drift apart. Profiles:

* `cpu`: the four sub-models are python-backend models running their ONNX file with onnxruntime (the
  tritonserver bundled in the pytriton wheel has no onnxruntime or TensorRT backend);
* `gpu`: `text_encoder`, `prompt_embedder`, `unet` and `vae_decoder` are `platform: "tensorrt_plan"` models
  (engines built from the same ONNX files on the GPU they will run on; NGC tritonserver image);
* `torch`: `text_encoder`, `unet` and `vae_decoder` are python models running the checkpoint's own torch modules
  (on CUDA when there is a GPU, answering in GPU memory as engines do), `prompt_embedder` as in `cpu`: the GPU data
  path on machines with CUDA torch but no TensorRT.

`prompt_embedder` (MiniLM) is in the repository only when the engine retrieves with it (`embedder` resolves to
"minilm"); by default retrieval is pooled from the `text_encoder` execution that conditions the UNet.

The BLS orchestrator `nirvana` (N instances, engine settings in `nirvana/engine.json`) and the single-instance
`cache` model (the one owner of the cache state) are python models in every profile.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tritonclient.grpc import model_config_pb2 as mc

from nirvana.contract.controlnet import CONTROLNET_PREFIX, UNET_CONTROL_MODEL
from nirvana.contract.dit import DIT_MODEL_NAMES
from nirvana.contract.specs import (
    ADAPTERS_MODEL,
    CACHE_MODEL,
    DEFAULT_UNET_MAX_BATCH,
    NIRVANA_MODEL,
    SDXL_MODEL_NAMES,
    STEP_SCHEDULER_MODEL,
    ModelSpec,
    adapters_spec,
    cache_spec,
    nirvana_spec,
    step_scheduler_spec,
)
from nirvana_export.model_config import SECRET_FILE, RepositoryError, model_config, render
from nirvana_export.tensorrt_build import engine_profiles

if TYPE_CHECKING:
    from nirvana.checkpoint import CheckpointInfo

PROFILES = ("cpu", "gpu", "torch")
SUBMODEL_PY = (
    '"""Triton python model: runs this version\'s model.onnx with onnxruntime (CPU profile)."""\n\n'
    "from nirvana.serving.onnx_model import TritonPythonModel  # noqa: F401\n"
)
ADAPTERS_PY = (
    '"""Triton python model `adapters`: a UNet model per LoRA set (glue in nirvana.serving.adapter_model)."""\n\n'
    "from nirvana.serving.adapter_model import TritonPythonModel  # noqa: F401\n"
)
TORCH_PY = (
    '"""Triton python model: runs the checkpoint\'s torch module for this sub-model (torch profile)."""\n\n'
    "from nirvana.serving.torch_model import TritonPythonModel  # noqa: F401\n"
)
# In the torch profile; the embedder stays ONNX.
TORCH_MODELS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "vae_decoder")
NIRVANA_PY = (
    '"""Triton python model `nirvana`: the BLS orchestrator (glue in nirvana.serving.bls_model)."""\n\n'
    "from nirvana.serving.bls_model import TritonPythonModel  # noqa: F401\n"
)
CACHE_PY = (
    '"""Triton python model `cache`: the one owner of the cache state (glue in nirvana.serving.cache_model)."""\n\n'
    "from nirvana.serving.cache_model import TritonPythonModel  # noqa: F401\n"
)
# `nirvana` instances per profile: each serves one request at a time in its own stub process (≈ 235 MiB with torch)
# and mostly waits on sub-models, so 8 in flight fill the UNet's 16 rows. Measured on 2 cores (tiny model, 20 steps,
# 8 in flight): 4 instances gave 3.7 rows per UNet execution, 8 gave 6.7, at the same images/s.
DEFAULT_INSTANCES = {"cpu": 8, "gpu": 8, "torch": 8}
MANIFEST = "repository_manifest.json"
# Internal single-instance models: the orchestrators (8 by default, plus streams) keep a few requests each in flight
INTERNAL_QUEUE = 256
# How long Triton holds a batched model's first queued request for others to join (µs): about a tenth of a UNet
# step on a GPU, so a lone request waits little and concurrent requests' steps merge. No preferred_batch_size: the
# batcher sends what has arrived when the delay ends instead of waiting for a batch size.
DEFAULT_QUEUE_DELAY_US = 1500


def submodel_config(
    spec: ModelSpec,
    profile: str,
    instances: int = 1,
    *,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    checkpoint: Path | None = None,
) -> str:
    """config.pbtxt of one sub-model for `profile`. A spec with max_batch_size > 0 (the UNet) gets dynamic
    batching that holds a request at most `queue_delay_us` µs for others to join its execution. The torch
    profile's models load their module from `checkpoint`."""
    if profile not in PROFILES:
        raise RepositoryError(f"profile={profile!r}: choose one of {PROFILES}")
    if queue_delay_us < 0:
        raise RepositoryError(f"queue_delay_us={queue_delay_us}: must be ≥ 0")
    config = model_config(spec)
    if spec.max_batch_size > 0:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
        _bounded_queue(config, INTERNAL_QUEUE * 4)  # the UNet's queue holds a few requests per orchestrator step
    if profile == "torch" and _torch_module(spec.name):
        if checkpoint is None:
            raise RepositoryError(f"profile='torch': model {spec.name!r} needs the checkpoint folder")
        config.backend = "python"
        config.parameters["checkpoint"].string_value = str(Path(checkpoint).resolve())
        if spec.name.startswith(CONTROLNET_PREFIX):  # its folder comes from the engine configuration
            config.parameters["engine_config"].string_value = f"../{NIRVANA_MODEL}/engine.json"
            config.parameters["controlnet"].string_value = spec.name.removeprefix(CONTROLNET_PREFIX)
        config.parameters["device"].string_value = "auto"  # cuda:0 when torch sees a GPU, else cpu
        # Hand GPU inputs over as they are (the orchestrator keeps the text conditioning on the GPU).
        config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value = "no"
    elif profile in ("cpu", "torch"):
        config.backend = "python"
        config.parameters["intra_op_threads"].string_value = "1"
    else:
        config.platform = "tensorrt_plan"
        if spec.max_batch_size > 0:
            _cuda_graphs(config, spec.max_batch_size)
    # A python model picks its device itself; KIND_GPU would refuse to load on a machine without one.
    kind = mc.ModelInstanceGroup.KIND_GPU if profile == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    group = config.instance_group.add(count=instances, kind=kind)
    if profile == "gpu" and spec.max_batch_size > 0:  # the UNet plan's profiles (a lone pair, a full batch)
        group.profile.extend(str(i) for i in range(len(engine_profiles(spec))))
    return render(config)


def _cuda_graphs(config: mc.ModelConfig, max_rows: int) -> None:
    """The batched UNet plan replays one CUDA graph per row count the step scheduler sends (guidance pairs: 2, 4, …,
    `max_rows`): one launch per iteration instead of one per kernel. Triton's TensorRT backend captures them when the
    model loads; a row count without a graph runs as before."""
    cuda = config.optimization.cuda
    cuda.graphs = True
    for rows in range(2, max_rows + 1, 2):
        cuda.graph_spec.add(batch_size=rows)


def _torch_module(name: str) -> bool:
    """Whether the torch profile runs model ``name`` as a torch module (all but the MiniLM embedder)."""
    return name in TORCH_MODELS or name == UNET_CONTROL_MODEL or name.startswith(CONTROLNET_PREFIX)


def nirvana_config(
    image_size: tuple[int, int],
    max_queue_size: int = 64,
    queue_timeout_s: int = 300,
    instances: int = DEFAULT_INSTANCES["cpu"],
    conditioning_device: str = "cpu",
) -> str:
    """config.pbtxt of the BLS model `nirvana` (contract: `nirvana.contract.specs.nirvana_spec`), `instances` stateless
    orchestrators (each its own stub process; the cache state lives in the `cache` model)."""
    if instances < 1:
        raise RepositoryError(f"instances={instances}: must be ≥ 1")
    config = model_config(nirvana_spec(image_size))
    config.backend = "python"
    config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    # Overload is rejected at the queue, not absorbed as memory growth.
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = max_queue_size
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = queue_timeout_s * 1_000_000
    policy.allow_timeout_override = True
    config.parameters["engine_config"].string_value = "engine.json"
    # Where the text encoder's output is delivered ("auto": the GPU when the stub's torch has CUDA).
    config.parameters["conditioning_device"].string_value = conditioning_device
    return render(config)


def _bounded_queue(config: mc.ModelConfig, size: int, timeout_s: int = 60) -> None:
    """Requests beyond `size` waiting are refused at once, and none waits longer than `timeout_s`: a flood (or a
    stuck model) shows as errors, not as memory growth."""
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = size
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = timeout_s * 1_000_000


def _unqueued(config: mc.ModelConfig) -> None:
    """No dynamic batcher for a decoupled single-instance model: its `execute` hands each request to a thread and
    returns, so Triton's queue would hold nothing, and the batcher's wait for a free instance can miss its wake-up
    and sleep its 500 ms default (`WaitForPayloadSlotAvailable` in Triton core waits on a mutex the notifier does not
    take). Measured on 2 cores, tiny model, 4 requests of 20 steps sent together, 10 rounds: 4 rounds had a loop
    that entered the step scheduler ~500 ms late, after the others had finished (41 UNet executions instead of 21).
    Without it, requests go straight to the instance; such a model bounds what it holds itself."""
    config.ClearField("dynamic_batching")


SCHEDULER_PY = (
    '"""Triton python model `step_scheduler`: every request\'s denoising loop (glue in nirvana.serving.scheduler_model)'
    '."""'
    "\n\nfrom nirvana.serving.scheduler_model import TritonPythonModel  # noqa: F401\n"
)


def step_scheduler_config(profile: str, max_rows: int) -> str:
    """config.pbtxt of the decoupled `step_scheduler` (contract: `nirvana.contract.specs.step_scheduler_spec`): one
    instance holds every request's loop, so each UNet execution carries all of them. The cpu and torch profiles run the
    UNet inside it (no hop per iteration); the gpu profile calls the `unet` TensorRT plan through BLS."""
    config = model_config(step_scheduler_spec())
    config.backend = "python"
    config.model_transaction_policy.decoupled = True
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    _unqueued(config)  # it bounds the loops it holds itself (`nirvana.serving.scheduler_model.MAX_HELD`)
    config.parameters["engine_config"].string_value = f"../{NIRVANA_MODEL}/engine.json"
    config.parameters["unet_runner"].string_value = "bls" if profile == "gpu" else "session"
    config.parameters["max_rows"].string_value = str(max_rows)
    config.parameters["intra_op_threads"].string_value = "1"
    # Where a ControlNet's residuals are delivered between its model and the UNet's (`scheduler_control`): host
    # memory until a GPU run has checked "gpu" (residuals of 16 rows are ~430 MB, past Triton's default 64 MB CUDA
    # memory pool) — edit this parameter to "gpu" (or "auto": where torch sees CUDA) to keep them on the device.
    config.parameters["residual_memory"].string_value = "cpu"
    if profile == "torch":  # the in-process torch UNet replays a CUDA graph per row count ("false": eager)
        config.parameters["cuda_graphs"].string_value = "true"
    return render(config)


def cache_config() -> str:
    """config.pbtxt of the `cache` model (contract: `nirvana.contract.specs.cache_spec`): exactly one instance, since
    Triton runs each instance in its own stub process and a milvus-lite file admits one process. It reads the `nirvana`
    model's engine.json, so both always run one configuration."""
    config = model_config(cache_spec())
    config.backend = "python"
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    _bounded_queue(config, INTERNAL_QUEUE)
    config.parameters["engine_config"].string_value = f"../{NIRVANA_MODEL}/engine.json"
    return render(config)


def adapters_config() -> str:
    """config.pbtxt of the decoupled `adapters` model (contract: `nirvana.contract.specs.adapters_spec`): one
    instance, which loads a UNet model per LoRA set through the model-control API; it reads the `nirvana` model's
    engine.json."""
    config = model_config(adapters_spec())
    config.backend = "python"
    config.model_transaction_policy.decoupled = True
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    _unqueued(config)  # its pool bounds the sets that wait to load (`adapters.max_pending_loads`)
    config.parameters["engine_config"].string_value = f"../{NIRVANA_MODEL}/engine.json"
    return render(config)


def render_configs(
    specs: dict[str, ModelSpec],
    image_size: tuple[int, int],
    profile: str,
    instances: int | None = None,
    *,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    checkpoint: Path | None = None,
    embedder: str = "clip",
    adapters: bool = False,
    control: dict[str, ModelSpec] | None = None,
    step_scheduler: bool = True,
    **nirvana_options: int,
) -> dict[str, str]:
    """Relative path → text of every config.pbtxt and model.py of a repository (no weights).

    `instances`: `nirvana` instances (default `DEFAULT_INSTANCES[profile]`); `queue_delay_us`: the UNet's dynamic
    batching delay; `checkpoint`: the folder the torch profile loads; `embedder`: the resolved retrieval embedder
    (the `prompt_embedder` model is served for "minilm" only); `adapters`: serve LoRA adapter sets (the `adapters`
    model; cpu and torch profiles); `control`: the served ControlNets' specs (`unet_control`, `controlnet_<name>`);
    `step_scheduler`: the orchestrators hand their denoising loops to the `step_scheduler` model (False: each runs
    its own loop, calling the `unet` model per step); `nirvana_options`: max_queue_size, queue_timeout_s of the BLS
    model."""
    if adapters and profile == "gpu":
        raise RepositoryError(
            "profile='gpu': LoRA adapters are served in the cpu and torch profiles only so far (TensorRT refit is "
            "not built); use the torch profile on a GPU"
        )
    specs = {**specs, **(control or {})}
    names = served_submodels(embedder, specs)
    files = {
        f"{name}/config.pbtxt": submodel_config(
            specs[name], profile, queue_delay_us=queue_delay_us, checkpoint=checkpoint
        )
        for name in names
    }
    for name in names if profile != "gpu" else ():
        files[f"{name}/1/model.py"] = TORCH_PY if profile == "torch" and _torch_module(name) else SUBMODEL_PY
    instances = instances or DEFAULT_INSTANCES[profile]
    # Only the torch profile's orchestrators have CUDA torch; the TensorRT image ships CPU torch.
    device = "auto" if profile == "torch" else "cpu"
    files[f"{NIRVANA_MODEL}/config.pbtxt"] = nirvana_config(
        image_size, instances=instances, conditioning_device=device, **nirvana_options
    )
    files[f"{NIRVANA_MODEL}/1/model.py"] = NIRVANA_PY
    files[f"{CACHE_MODEL}/config.pbtxt"] = cache_config()
    files[f"{CACHE_MODEL}/1/model.py"] = CACHE_PY
    if step_scheduler:
        files[f"{STEP_SCHEDULER_MODEL}/config.pbtxt"] = step_scheduler_config(profile, specs["unet"].max_batch_size)
        files[f"{STEP_SCHEDULER_MODEL}/1/model.py"] = SCHEDULER_PY
    if adapters:
        files[f"{ADAPTERS_MODEL}/config.pbtxt"] = adapters_config()
        files[f"{ADAPTERS_MODEL}/1/model.py"] = ADAPTERS_PY
    from nirvana_export.stream_config import stream_files

    files |= stream_files(image_size, specs["unet"], conditioning_device=device, **nirvana_options)
    return files


def served_submodels(embedder: str, specs: dict[str, ModelSpec]) -> tuple[str, ...]:
    """The sub-models a repository serves for a resolved `embedder` (MiniLM needs its own model, CLIP does not),
    of those `specs` has (SDXL's include `text_encoder_2`)."""
    return tuple(name for name in specs if embedder == "minilm" or name != "prompt_embedder")


def write_repository(
    checkpoint_dir: Path,
    out: Path,
    profile: str,
    engine_config: dict,
    *,
    max_batch: int = 2,
    fp16: bool = True,
    vae_fp16: bool = True,
    unet_max_batch: int = DEFAULT_UNET_MAX_BATCH,
    instances: int | None = None,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    step_scheduler: bool = True,
    **nirvana_options: int,
) -> Path:
    """Export, check and lay out a full repository; reuses the previous export when the checkpoint is unchanged.

    `instances`: `nirvana` orchestrator instances (default per profile, `DEFAULT_INSTANCES`); `unet_max_batch`:
    UNet rows per execution (8 requests' guidance pairs by default); `vae_fp16=False` builds the VAE engine in
    fp32 (SDXL's VAE overflows in fp16)."""
    from nirvana.checkpoint import fingerprint_checkpoint, load_checkpoint_info
    from nirvana.contract.specs import submodel_specs
    from nirvana.embed import resolve_embedder
    from nirvana_export.controlnet_export import remove_stale, served_controlnets

    out = Path(out)
    checkpoint = load_checkpoint_info(checkpoint_dir)
    _check_dit_profile(checkpoint, profile)
    # Resolved once here, so the orchestrators and the cache model read the same name from engine.json.
    embedder = resolve_embedder(engine_config.get("embedder", "auto"), checkpoint)
    engine_config = {**engine_config, "embedder": embedder}
    fingerprint = fingerprint_checkpoint(checkpoint_dir)
    # SDXL's VAE overflows in fp16 (diffusers upcasts it too, `force_upcast`): its engine is built in fp32.
    vae_fp16 = vae_fp16 and checkpoint.family != "sdxl"
    stamp = {"fingerprint": fingerprint, "profile": profile, "max_batch": max_batch, "fp16": fp16}
    stamp |= {"vae_fp16": vae_fp16, "unet_max_batch": unet_max_batch, "embedder": embedder}
    control, stamp["controlnets"] = served_controlnets(Path(checkpoint_dir), engine_config, unet_max_batch)
    manifest_path = out / MANIFEST
    fresh = not (manifest_path.exists() and json.loads(manifest_path.read_text()) == stamp)
    specs = submodel_specs(checkpoint, max_batch=max_batch, unet_max_batch=unet_max_batch)
    if fresh:
        manifest_path.unlink(missing_ok=True)  # a failed export must never look like a finished one
        for name in {*SDXL_MODEL_NAMES, *DIT_MODEL_NAMES}:  # a model not served any more must not stay loadable
            shutil.rmtree(out / name, ignore_errors=True)
        remove_stale(out)
        _export_weights(Path(checkpoint_dir), out, profile, specs, stamp, control)
    configs = render_configs(
        specs,
        checkpoint.image_size,
        profile,
        instances,
        queue_delay_us=queue_delay_us,
        checkpoint=Path(checkpoint_dir),
        embedder=embedder,
        adapters=bool((engine_config.get("adapters") or {}).get("dir")),
        control=control,
        step_scheduler=step_scheduler,
        **nirvana_options,
    )
    for optional in (ADAPTERS_MODEL, STEP_SCHEDULER_MODEL):  # served only while the configuration asks for them
        shutil.rmtree(out / optional, ignore_errors=True)
    for rel, text in configs.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    (out / "nirvana" / "engine.json").write_text(json.dumps(engine_config, indent=2, default=str) + "\n")
    place_secret(out, (engine_config.get("security") or {}).get("internal_secret_file"))
    manifest_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return out


def _check_dit_profile(checkpoint: CheckpointInfo, profile: str) -> None:
    """The transformer families' profiles so far: cpu and torch (see docs/serving.md)."""
    from nirvana.checkpoint import CheckpointError
    from nirvana.families import DIT

    where = f"{checkpoint.path}: {checkpoint.family} (a transformer family)"
    if checkpoint.family in DIT and profile == "gpu":
        raise CheckpointError(f"{where} has no TensorRT engines yet (profile='gpu'); use --profile torch on a GPU")


def place_secret(out: Path, configured: str | Path | None) -> Path:
    """`out`/internal.secret, which every python model's config names: a link to the configured secret (e.g. a
    mounted Kubernetes Secret, which need not exist yet where the repository is built), else a file generated once."""
    from nirvana.security.credential import ensure_secret_file

    path = out / SECRET_FILE
    if configured is None:
        if path.is_symlink():  # it pointed at a secret the configuration no longer names
            path.unlink()
        return ensure_secret_file(path)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(Path(configured))
    return path


def _export_weights(
    checkpoint_dir: Path, out: Path, profile: str, specs: dict[str, ModelSpec], stamp: dict, control: dict
) -> None:
    """Export (and on gpu build) the served sub-models of ``specs`` and the served ControlNets of ``control``."""
    from nirvana_export.onnx_export import export_all

    staging = out / ".onnx"
    shutil.rmtree(staging, ignore_errors=True)
    # The torch profile runs the checkpoint's modules itself: only the embedder (if served) needs an ONNX file.
    served = served_submodels(stamp["embedder"], specs)
    names = [n for n in served if n not in TORCH_MODELS] if profile == "torch" else list(served)
    if not names:  # the torch profile retrieving with CLIP: nothing to export, no checkpoint to load for it
        return
    paths = export_all(
        checkpoint_dir, staging, max_batch=stamp["max_batch"], unet_max_batch=stamp["unet_max_batch"], names=names
    )
    if control and profile != "torch":  # the torch profile runs the modules themselves
        from nirvana_export.controlnet_export import export_control_models

        paths |= export_control_models(checkpoint_dir, Path(stamp["controlnets"]["dir"]), control, staging)
        specs = specs | control
    for name, onnx_file in paths.items():
        version_dir = out / name / "1"
        version_dir.mkdir(parents=True)
        if profile != "gpu":
            for item in onnx_file.parent.iterdir():  # model.onnx and any external-data files beside it
                shutil.move(str(item), version_dir / item.name)
        else:
            from nirvana_export.tensorrt_build import TIMING_CACHE_NAME, build_engine, engine_fp16

            fp16 = engine_fp16(name, stamp["fp16"], stamp["vae_fp16"])
            # The timing cache lives beside the engines (the repository volume): a rebuild reuses its tactics.
            build_engine(onnx_file, specs[name], version_dir / "model.plan", fp16, timing_cache=out / TIMING_CACHE_NAME)
    shutil.move(str(staging / "export_manifest.json"), out / "export_manifest.json")
    shutil.rmtree(staging, ignore_errors=True)


def sd15_specs(max_batch: int = 2, unet_max_batch: int | None = None) -> dict[str, ModelSpec]:
    """Specs of Stable Diffusion 1.5 at 512×512 (77×768 text, 4×64×64 latent), without needing its weights.

    `unet_max_batch`: the UNet's max_batch_size in rows (default `nirvana.contract.specs.DEFAULT_UNET_MAX_BATCH`)."""
    from nirvana.contract.specs import (
        DEFAULT_UNET_MAX_BATCH,
        prompt_embedder_spec,
        text_encoder_spec,
        unet_spec,
        vae_decoder_spec,
    )

    specs = (
        text_encoder_spec(77, 768, max_batch),
        prompt_embedder_spec(128, max_batch),
        unet_spec(4, (64, 64), 77, 768, unet_max_batch or DEFAULT_UNET_MAX_BATCH),
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
