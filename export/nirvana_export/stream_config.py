"""config.pbtxt of the decoupled `nirvana_stream` model (contract: `nirvana.contract.stream`), beside `nirvana`.

It runs the `nirvana` model's engine (same engine.json, same sub-models and `cache` model, the same batched UNet),
so a streamed request and a plain one with the same inputs give the same image.
"""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from nirvana.contract.specs import NIRVANA_MODEL, ModelSpec
from nirvana.contract.stream import STREAM_MODEL, nirvana_stream_spec
from nirvana_export.model_config import RepositoryError, model_config, render

STREAM_PY = (
    '"""Triton python model `nirvana_stream`: decoupled, progress and previews (glue in '
    'nirvana.serving.stream_model)."""\n\n'
    "from nirvana.serving.stream_model import TritonPythonModel  # noqa: F401\n"
)
# Stub processes × threads: 2 × 4 = 8 streams at once, the requests the UNet's 16 rows hold (see stream_model).
DEFAULT_STREAM_INSTANCES = 2
DEFAULT_STREAMS_PER_INSTANCE = 4


def stream_config(
    image_size: tuple[int, int],
    unet: ModelSpec,
    instances: int = DEFAULT_STREAM_INSTANCES,
    streams_per_instance: int = DEFAULT_STREAMS_PER_INSTANCE,
    max_queue_size: int = 64,
    queue_timeout_s: int = 300,
    conditioning_device: str = "cpu",
) -> str:
    """The config for a checkpoint of `image_size` whose UNet spec is `unet` (the preview is its latent's size)."""
    if instances < 1 or streams_per_instance < 1:
        raise RepositoryError(f"instances={instances}, streams_per_instance={streams_per_instance}: must be ≥ 1")
    latent_size = tuple(int(d) for d in unet.input("sample").shape[2:])
    config = model_config(nirvana_stream_spec(image_size, latent_size))  # type: ignore[arg-type]
    config.backend = "python"
    config.model_transaction_policy.decoupled = True
    config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = max_queue_size
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = queue_timeout_s * 1_000_000
    config.parameters["engine_config"].string_value = f"../{NIRVANA_MODEL}/engine.json"
    config.parameters["conditioning_device"].string_value = conditioning_device
    config.parameters["streams_per_instance"].string_value = str(streams_per_instance)
    return render(config)


def stream_files(image_size: tuple[int, int], unet: ModelSpec, **options: object) -> dict[str, str]:
    """Relative path → text of the model's config.pbtxt and model.py."""
    return {
        f"{STREAM_MODEL}/config.pbtxt": stream_config(image_size, unet, **options),  # type: ignore[arg-type]
        f"{STREAM_MODEL}/1/model.py": STREAM_PY,
    }
