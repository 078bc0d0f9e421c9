"""Triton configs are ModelConfig protobufs rendered from the specs; the committed model_repository/ must not drift."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from nirvana.contract.specs import MODEL_NAMES, TRITON_DTYPES, ModelSpec, needs_reshape, nirvana_spec, triton_dims
from nirvana_export.repository import (
    DEFAULT_QUEUE_DELAY_US,
    INTERNAL_QUEUE,
    RepositoryError,
    adapters_config,
    cache_config,
    nirvana_config,
    reference_repository,
    render_configs,
    sd15_specs,
    step_scheduler_config,
    submodel_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _parse(text: str) -> mc.ModelConfig:
    """What Triton reads: the text parsed back into its own protobuf (a typo'd field name raises here)."""
    return text_format.Parse(text, mc.ModelConfig())


def _assert_tensors_match(config: mc.ModelConfig, spec: ModelSpec) -> None:
    for messages, tensors in ((config.input, spec.inputs), (config.output, spec.outputs)):
        assert [m.name for m in messages] == [t.name for t in tensors]
        for message, tensor in zip(messages, tensors, strict=True):
            assert mc.DataType.Name(message.data_type) == TRITON_DTYPES[tensor.dtype]
            assert list(message.dims) == triton_dims(tensor, batched=config.max_batch_size > 0)
            assert message.HasField("reshape") == needs_reshape(tensor, config.max_batch_size > 0)
            assert list(message.reshape.shape) == []
    for message, tensor in zip(config.input, spec.inputs, strict=True):
        assert message.optional == tensor.optional


def test_committed_model_repository_matches_the_specs() -> None:
    expected = reference_repository()
    committed = {
        p.relative_to(ROOT / "model_repository").as_posix(): p.read_text()
        for p in (ROOT / "model_repository").rglob("*")
        if p.is_file() and p.suffix in (".pbtxt", ".py")
    }
    assert committed == expected, "regenerate with: python -m nirvana_export.repository model_repository"


def test_submodel_configs_list_every_spec_tensor_with_dims_and_types() -> None:
    for name, spec in sd15_specs().items():
        config = _parse(submodel_config(spec, "gpu"))
        assert config.name == name and config.platform == "tensorrt_plan"
        assert config.max_batch_size == spec.max_batch_size == (16 if name == "unet" else 0)
        assert config.HasField("dynamic_batching") == (name == "unet")
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        _assert_tensors_match(config, spec)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_unet_batches_requests_with_a_short_queue_delay_and_no_preferred_size(profile: str) -> None:
    spec = sd15_specs(unet_max_batch=32)["unet"]
    config = _parse(submodel_config(spec, profile, queue_delay_us=700))
    assert config.max_batch_size == 32
    assert [list(i.dims) for i in config.input] == [[4, 64, 64], [1], [77, 768]]
    assert list(config.output[0].dims) == [4, 64, 64]
    # timestep: clients send [rows, 1], the model (python or TensorRT) receives [rows].
    assert config.input[1].HasField("reshape") and list(config.input[1].reshape.shape) == []
    assert config.dynamic_batching.max_queue_delay_microseconds == 700
    assert list(config.dynamic_batching.preferred_batch_size) == []
    default = _parse(submodel_config(spec, profile))
    assert default.dynamic_batching.max_queue_delay_microseconds == DEFAULT_QUEUE_DELAY_US == 1500
    with pytest.raises(RepositoryError, match=r"queue_delay_us=-1"):
        submodel_config(spec, profile, queue_delay_us=-1)


def test_nirvana_config_is_its_spec_with_a_bounded_rejecting_queue() -> None:
    config = _parse(nirvana_config((512, 768), max_queue_size=7, queue_timeout_s=9))
    spec = nirvana_spec((512, 768))
    _assert_tensors_match(config, spec)
    assert [t.name for t in spec.inputs if not t.optional] == ["PROMPT"]
    assert list(config.output[0].dims) == [512, 768, 3] and config.output[0].data_type == mc.TYPE_UINT8
    policy = config.dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.timeout_action) == (7, mc.ModelQueuePolicy.REJECT)
    assert policy.default_timeout_microseconds == 9_000_000
    assert config.parameters["engine_config"].string_value == "engine.json"


def test_cpu_profile_serves_onnx_through_python_models() -> None:
    files = render_configs(sd15_specs(), (512, 512), "cpu", embedder="minilm")
    for name in MODEL_NAMES:
        config = _parse(files[f"{name}/config.pbtxt"])
        assert config.backend == "python" and config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert "nirvana.serving.onnx_model" in files[f"{name}/1/model.py"]
    assert "nirvana.serving.bls_model" in files["nirvana/1/model.py"]


def test_prompt_embedder_is_served_only_for_minilm() -> None:
    # Retrieval pooled from the text_encoder execution (clip): no MiniLM model loaded, no extra model call.
    clip = render_configs(sd15_specs(), (512, 512), "cpu")
    assert not any(path.startswith("prompt_embedder/") for path in clip)
    assert {"text_encoder/config.pbtxt", "unet/config.pbtxt", "vae_decoder/config.pbtxt"} <= set(clip)
    assert "prompt_embedder/config.pbtxt" in render_configs(sd15_specs(), (512, 512), "cpu", embedder="minilm")


def test_torch_profile_serves_the_checkpoints_modules_and_the_onnx_embedder(tmp_path) -> None:
    files = render_configs(sd15_specs(), (512, 512), "torch", checkpoint=tmp_path, embedder="minilm")
    for name in ("text_encoder", "unet", "vae_decoder"):
        config = _parse(files[f"{name}/config.pbtxt"])
        assert config.backend == "python" and config.parameters["checkpoint"].string_value == str(tmp_path)
        # GPU inputs (the text conditioning the orchestrator keeps on the GPU) arrive without a copy to the host.
        assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
        assert "nirvana.serving.torch_model" in files[f"{name}/1/model.py"]
    assert "nirvana.serving.onnx_model" in files["prompt_embedder/1/model.py"]
    assert _parse(files["unet/config.pbtxt"]).dynamic_batching.max_queue_delay_microseconds > 0
    with pytest.raises(RepositoryError, match="needs the checkpoint"):
        render_configs(sd15_specs(), (512, 512), "torch")


def test_unknown_profile_is_rejected() -> None:
    with pytest.raises(RepositoryError, match="profile='tpu'"):
        submodel_config(sd15_specs()["unet"], "tpu")


def test_stream_model_is_decoupled_with_the_nirvana_contract_plus_events_and_previews() -> None:
    from nirvana.contract.stream import nirvana_stream_spec

    files = render_configs(sd15_specs(), (512, 512), "cpu", max_queue_size=5)
    config = _parse(files["nirvana_stream/config.pbtxt"])
    spec = nirvana_stream_spec((512, 512), (64, 64))
    _assert_tensors_match(config, spec)
    plain = nirvana_spec((512, 512))
    assert spec.input_names == [*plain.input_names, "PREVIEW_EVERY"] and spec.input("PREVIEW_EVERY").optional
    assert spec.output_names == [*plain.output_names, "EVENT", "PREVIEW"]
    assert list(config.output[-1].dims) == [64, 64, 3]  # the latent's size, not the image's
    assert config.model_transaction_policy.decoupled and config.backend == "python"
    assert config.parameters["engine_config"].string_value == "../nirvana/engine.json"  # the one engine config
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 5
    assert "nirvana.serving.stream_model" in files["nirvana_stream/1/model.py"]


def test_the_tensorrt_unet_replays_a_cuda_graph_per_row_count_the_scheduler_sends() -> None:
    spec = sd15_specs()["unet"]
    cuda = _parse(submodel_config(spec, "gpu")).optimization.cuda
    assert cuda.graphs and [g.batch_size for g in cuda.graph_spec] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert not _parse(submodel_config(spec, "cpu")).HasField("optimization")  # python models: no TensorRT graphs
    assert not _parse(submodel_config(sd15_specs()["vae_decoder"], "gpu")).optimization.cuda.graphs


def test_the_tensorrt_unet_instance_may_use_both_engine_profiles() -> None:
    spec = sd15_specs()["unet"]
    assert list(_parse(submodel_config(spec, "gpu")).instance_group[0].profile) == ["0", "1"]
    assert list(_parse(submodel_config(spec, "cpu")).instance_group[0].profile) == []
    assert list(_parse(submodel_config(sd15_specs()["vae_decoder"], "gpu")).instance_group[0].profile) == []


def test_decoupled_internal_models_get_requests_straight_not_through_a_dynamic_batcher() -> None:
    # Triton's batcher could leave a handed-off loop in its queue for 500 ms (`repository._unqueued`)
    for config in (_parse(step_scheduler_config("cpu", 16)), _parse(adapters_config())):
        assert config.model_transaction_policy.decoupled and not config.HasField("dynamic_batching")
    assert _parse(cache_config()).dynamic_batching.default_queue_policy.max_queue_size == INTERNAL_QUEUE
