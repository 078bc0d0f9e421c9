"""The Helm chart (deploy/helm/nirvana): lint, render for the acceptance value sets, validate every manifest.

Kubernetes objects are validated with kubernetes-validate in strict mode (unknown fields are errors) for each
version in KUBE_VERSIONS. The Prometheus Operator's kinds have no schema there: they are checked against the
subset of their CRD schema the chart uses. The Milvus dependency cannot be downloaded here, so the
`milvus-dependency` set renders this chart's objects with `milvus.enabled: true` and the subchart absent; once
`helm dependency update` has vendored it into charts/, the same test also finds the Milvus objects.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_helpers import CHART, DOCKER, KUBE_VERSIONS, RELEASE, VALUE_SETS, find, only, render, values_of

from nirvana.config import load_config

# The fields of the Prometheus Operator CRDs (monitoring.coreos.com/v1) the chart uses; anything else is a typo.
_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_META = {"type": "object", "required": ["name"], "properties": {"name": _STR, "labels": _LABELS}}
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {"matchLabels": _LABELS}}
CRD_SCHEMAS = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": _SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchNames": {"type": "array", "items": _STR}},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"port": _STR, "path": _STR, "interval": _STR},
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name", "rules"],
                            "properties": {
                                "name": _STR,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["expr"],
                                        "properties": {
                                            "record": _STR,
                                            "alert": _STR,
                                            "expr": _STR,
                                            "for": _STR,
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return only(docs, "Deployment", RELEASE)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container["env"]}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_reports_nothing_but_the_offline_dependency(value_set: str) -> None:
    report = helm.lint(str(CHART), values=values_of(value_set), strict=True, kube_version="v1.27.0")
    problems = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    # The Milvus subchart is declared but cannot be fetched without network (see the module docstring).
    assert all("missing these dependencies: milvus" in p for p in problems), problems


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_is_valid_kubernetes(
    rendered_sets: dict[str, list[dict[str, Any]]], value_set: str, kube_version: str
) -> None:
    docs = rendered_sets[value_set]
    assert docs
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{value_set}: {where} is invalid for Kubernetes {kube_version}: {err.message} at {err.path}")


def test_strict_validation_catches_an_unknown_field(rendered_sets: dict[str, list[dict[str, Any]]]) -> None:
    """The validator is not vacuous: a misspelled probe field is rejected."""
    deployment = json.loads(json.dumps(_deployment(rendered_sets["single-gpu"])))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"replicaCount": 0}, "/replicaCount"),
        ({"replicas": 2}, "additional properties 'replicas'"),
        ({"latentStore": {"size": "10 gigs"}}, "/latentStore/size"),
        ({"resources": {"limits": {"nvidia.com/gpu": 0}}}, "nvidia.com~1gpu"),
        ({"checkpoint": {"source": "s3"}}, "/checkpoint/source"),
        ({"checkpoint": {"source": "pvc", "pvc": {"claimName": ""}}}, "/checkpoint/pvc/claimName"),
        ({"externalMilvus": {"uri": "milvus:19530"}}, "/externalMilvus/uri"),
        # milvus-lite admits one process: several replicas need a Milvus server ...
        ({"replicaCount": 4}, "/replicaCount"),
        # ... and a latent volume that several nodes can mount.
        (
            {
                "replicaCount": 4,
                "externalMilvus": {"uri": "http://m:19530"},
                "latentStore": {"accessMode": "ReadWriteOnce"},
            },
            "/latentStore/accessMode",
        ),
        ({"metrics": {"prometheusRule": {"hitRateMin": 5}}}, "/metrics/prometheusRule/hitRateMin"),
        # The chart owns where credentials are mounted; the Milvus dependency runs with authentication on.
        ({"engineConfig": {"security": {"internal_secret_file": "/x"}}}, "/engineConfig/security"),
        ({"engineConfig": {"cache": {"milvus_token_file": "/x"}}}, "/engineConfig/cache"),
        ({"engineConfig": {"security": {"tenant_header": ".*"}}}, "/engineConfig/security/tenant_header"),
        ({"security": {"adminKey": {"value": "hunter2"}}}, "additional properties 'value'"),
        ({"networkPolicy": {"gateway": {"podSelector": {}}}}, "/networkPolicy/gateway"),
    ],
)
def test_a_broken_value_fails_the_schema(chart: Any, override: dict[str, Any], message: str) -> None:
    values = _merge(values_of("single-gpu"), override)  # a valid base, one value broken
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        chart.render(values=values, name=RELEASE)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_hpa_bounds_are_checked(chart: Any) -> None:
    values = _merge(values_of("milvus-dependency"), {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}})
    with pytest.raises(helm.HelmRenderError, match="minReplicas must not exceed"):
        chart.render(values=values, name=RELEASE)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pods_run_on_a_gpu_node_as_non_root(rendered_sets: dict[str, list[dict[str, Any]]], value_set: str) -> None:
    pod = _deployment(rendered_sets[value_set])["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "podAntiAffinity" in pod["affinity"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    builder = next(c for c in pod["initContainers"] if c["name"] == "build-engines")
    for container in (builder, pod["containers"][0]):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/dev/shm", "/models/repository", "/var/cache/nirvana", "/models/checkpoint"} <= mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_probes_use_triton_health_endpoints(rendered_sets: dict[str, list[dict[str, Any]]]) -> None:
    triton = _deployment(rendered_sets["single-gpu"])["spec"]["template"]["spec"]["containers"][0]
    assert triton["args"] == ["serve"]
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}


def test_single_gpu_uses_milvus_lite_on_its_own_volume(rendered_sets: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered_sets["single-gpu"]
    deployment = _deployment(docs)
    assert deployment["spec"]["replicas"] == 1
    assert _env(deployment["spec"]["template"]["spec"]["containers"][0])["NIRVANA_MILVUS_URI"] == ""
    assert only(docs, "PersistentVolumeClaim", f"{RELEASE}-latents")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not find(docs, "HorizontalPodAutoscaler") and not find(docs, "ServiceMonitor")


def test_four_replicas_share_an_external_milvus_and_one_latent_volume(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered_sets["four-replicas-external-milvus"]
    deployment = _deployment(docs)
    assert deployment["spec"]["replicas"] == 4
    pod = deployment["spec"]["template"]["spec"]
    env = _env(pod["containers"][0])
    assert env["NIRVANA_MILVUS_URI"] == "http://milvus.vector-db.svc.cluster.local:19530"
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-checkpoint", "build-engines"]
    latents = only(docs, "PersistentVolumeClaim", f"{RELEASE}-latents")
    assert latents["spec"]["accessModes"] == ["ReadWriteMany"]
    assert only(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_milvus_dependency_is_declared_and_wired(rendered_sets: dict[str, list[dict[str, Any]]]) -> None:
    declared = {d["name"]: d for d in yaml.safe_load((CHART / "Chart.yaml").read_text())["dependencies"]}
    assert declared["milvus"]["condition"] == "milvus.enabled"
    assert declared["milvus"]["repository"] == "https://zilliztech.github.io/milvus-helm/"
    docs = rendered_sets["milvus-dependency"]
    env = _env(_deployment(docs)["spec"]["template"]["spec"]["containers"][0])
    assert env["NIRVANA_MILVUS_URI"] == f"http://{RELEASE}-milvus:19530"  # the Milvus chart's Service name
    status = {d["name"]: d["status"] for d in helm.dependency_list(str(CHART))}
    if status["milvus"] == "ok":  # vendored by `helm dependency update`: its objects render too
        assert find(docs, "Service", f"{RELEASE}-milvus")


def test_hpa_scales_the_deployment_on_queue_time(rendered_sets: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered_sets["milvus-dependency"]
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELEASE}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "nirvana_queue_time_us_per_request"
    assert "replicas" not in _deployment(docs)["spec"]  # the HPA owns the count


def test_services_and_service_monitor_agree(rendered_sets: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered_sets["four-replicas-external-milvus"]
    container_ports = {p["name"] for p in _deployment(docs)["spec"]["template"]["spec"]["containers"][0]["ports"]}
    services = find(docs, "Service")
    assert {p["targetPort"] for s in services for p in s["spec"]["ports"]} == container_ports
    monitor = only(docs, "ServiceMonitor")
    selected = [
        s for s in services if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == [f"{RELEASE}-metrics"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_engine_config_is_accepted_by_the_engine(
    rendered_sets: dict[str, list[dict[str, Any]]], value_set: str, tmp_path: Any
) -> None:
    """The ConfigMap's config.json passes EngineConfig validation, merged as `nirvana export --config` does."""
    config_map = only(rendered_sets[value_set], "ConfigMap", f"{RELEASE}-config")
    config_file = tmp_path / "config.json"
    config_file.write_text(config_map["data"]["config.json"])
    env = _env(_deployment(rendered_sets[value_set])["spec"]["template"]["spec"]["containers"][0])
    cache = {"dir": "/var/cache/nirvana/cache"}
    if env["NIRVANA_MILVUS_URI"]:
        cache["milvus_uri"] = env["NIRVANA_MILVUS_URI"]
    config = load_config({"checkpoint": "/models/checkpoint", "cache": cache}, config_file)
    assert config.cache.max_entries == values_of(value_set).get("engineConfig", {}).get("cache", {}).get(
        "max_entries", 200_000
    )


@pytest.mark.parametrize(
    ("value_set", "strategy"), [("single-gpu", "Recreate"), ("milvus-dependency", "RollingUpdate")]
)
def test_rolling_updates_only_when_two_pods_can_share_the_cache(
    rendered_sets: dict[str, list[dict[str, Any]]], value_set: str, strategy: str
) -> None:
    """milvus-lite and ReadWriteOnce volumes admit one pod: a surge pod would wait forever on them."""
    assert _deployment(rendered_sets[value_set])["spec"]["strategy"]["type"] == strategy


def test_the_milvus_dependency_needs_its_credential(chart: Any) -> None:
    values = _merge(values_of("milvus-dependency"), {"security": {"milvusToken": {"existingSecret": ""}}})
    with pytest.raises(helm.HelmValuesError, match="/security/milvusToken/existingSecret"):
        chart.render(values=values, name=RELEASE)


# --- security (issue 31): restricted APIs, tenant header, credentials, NetworkPolicy, read-only repository ---

ADMIN_KEY_FILE = "/var/run/secrets/nirvana/admin/key"
INTERNAL_FILE = "/var/run/secrets/nirvana/internal/secret"
MILVUS_TOKEN_FILE = "/var/run/secrets/nirvana/milvus/token"


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _deployment(docs)["spec"]["template"]["spec"]


def _mounted_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(Secret name, key) of the Secret item `container` sees at `path`, or None."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "secret" not in volume or not path.startswith(mount["mountPath"] + "/"):
            continue
        for item in volume["secret"]["items"]:
            if f"{mount['mountPath']}/{item['path']}" == path:
                assert mount["readOnly"] is True
                return volume["secret"]["secretName"], item["key"]
    return None


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_the_serving_container_mounts_the_model_repository_read_only(
    rendered_sets: dict[str, list[dict[str, Any]]], value_set: str
) -> None:
    pod = _pod(rendered_sets[value_set])
    (triton,) = pod["containers"]
    mount = next(m for m in triton["volumeMounts"] if m["mountPath"] == "/models/repository")
    assert mount.get("readOnly") is True  # its model.py files are code Triton runs
    builder = next(c for c in pod["initContainers"] if c["name"] == "build-engines")
    assert not next(m for m in builder["volumeMounts"] if m["mountPath"] == "/models/repository").get("readOnly")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_tritonserver_gets_the_restricted_apis_and_tenant_forwarding(
    rendered_sets: dict[str, list[dict[str, Any]]], value_set: str, tmp_path: Any
) -> None:
    """The serving container runs the entrypoint's `serve` with the admin key file and tenant header the chart
    wires up; the entrypoint (run here, tritonserver a stand-in) turns them into the four flags."""
    docs = rendered_sets[value_set]
    pod = _pod(docs)
    (triton,) = pod["containers"]
    assert triton["args"] == ["serve"] and "command" not in triton  # the image's entrypoint, nothing else
    for container in pod.get("initContainers", []):
        assert "serve" not in container.get("args", []) and "tritonserver" not in str(container.get("command"))
    env = _env(triton)
    assert env["NIRVANA_ADMIN_KEY_FILE"] == ADMIN_KEY_FILE
    admin = values_of(value_set).get("security", {}).get("adminKey", {})
    secret_name = admin.get("existingSecret") or f"{RELEASE}-admin-key"
    assert _mounted_file(pod, triton, ADMIN_KEY_FILE) == (secret_name, admin.get("secretKey", "admin-key"))
    for container in pod.get("initContainers", []):  # the key is the server's alone
        assert _mounted_file(pod, container, ADMIN_KEY_FILE) is None
    assert env["NIRVANA_TENANT_HEADER"] == "x-nirvana-tenant"

    # The entrypoint with that environment (paths moved under tmp_path, tritonserver a stand-in).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tritonserver").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path}/args\n')
    (bin_dir / "tritonserver").chmod(0o755)
    repo = tmp_path / "repository" / "cpu"
    repo.mkdir(parents=True)
    (repo / "repository_manifest.json").write_text("{}")
    key_file = tmp_path / "admin-key"
    key_file.write_text("chartkey\n")
    run_env = {k: v for k, v in env.items() if v is not None}
    run_env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        NIRVANA_PROFILE="cpu",  # no GPU here: the cpu folder
        NIRVANA_MODEL_REPOSITORY=str(tmp_path / "repository"),
        NIRVANA_ADMIN_KEY_FILE=str(key_file),
        HOME=str(tmp_path),
    )
    result = subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh"), *triton["args"]], env=run_env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    restricted = "model-repository,shared-memory,logging,trace:nirvana-admin-key=chartkey"
    assert f"--grpc-restricted-protocol={restricted}" in args and f"--http-restricted-api={restricted}" in args
    assert {"--grpc-header-forward-pattern=^x-nirvana-tenant$", "--http-header-forward-pattern=^x-nirvana-tenant$"} <= (
        set(args)
    )


def test_a_configured_tenant_header_is_the_one_forwarded(chart: Any) -> None:
    values = _merge(values_of("single-gpu"), {"engineConfig": {"security": {"tenant_header": "x-org"}}})
    docs = render(chart, values)
    assert _env(_pod(docs)["containers"][0])["NIRVANA_TENANT_HEADER"] == "x-org"
    config = json.loads(only(docs, "ConfigMap", f"{RELEASE}-config")["data"]["config.json"])
    assert config["security"]["tenant_header"] == "x-org"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_credentials_are_mounted_files_the_engine_config_points_at(
    rendered_sets: dict[str, list[dict[str, Any]]], value_set: str, tmp_path: Any
) -> None:
    docs = rendered_sets[value_set]
    pod = _pod(docs)
    security = values_of(value_set).get("security", {})
    config_file = tmp_path / "config.json"
    config_file.write_text(only(docs, "ConfigMap", f"{RELEASE}-config")["data"]["config.json"])
    config = load_config({"checkpoint": "/models/checkpoint"}, config_file)
    assert str(config.security.internal_secret_file) == INTERNAL_FILE
    internal = security.get("internalSecret", {}).get("existingSecret") or f"{RELEASE}-internal"
    token = security.get("milvusToken", {})
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        if container["name"] == "fetch-checkpoint":
            assert not any(m["mountPath"].startswith("/var/run/secrets") for m in container["volumeMounts"])
            continue
        # The builder too: `nirvana export` writes the engine config the server's models read.
        assert _mounted_file(pod, container, INTERNAL_FILE) == (internal, "internal-secret")
        if token.get("existingSecret"):
            assert _mounted_file(pod, container, MILVUS_TOKEN_FILE) == (
                token["existingSecret"],
                token.get("secretKey", "token"),
            )
    if token.get("existingSecret"):
        assert str(config.cache.milvus_token_file) == MILVUS_TOKEN_FILE
    else:
        assert config.cache.milvus_token_file is None
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        for item in container.get("env", []):  # never a Secret in the environment
            assert "valueFrom" not in item or "secretKeyRef" not in item["valueFrom"], (container["name"], item)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_secret_value_appears_in_plain_text(rendered_sets: dict[str, list[dict[str, Any]]], value_set: str) -> None:
    """Created Secrets hold random values, base64 in `data`, and nothing else rendered (or values.yaml) holds them."""
    docs = rendered_sets[value_set]
    secrets = find(docs, "Secret")
    security = values_of(value_set).get("security", {})
    expected = {
        f"{RELEASE}-admin-key": "admin-key",
        f"{RELEASE}-internal": "internal-secret",
    }
    if security.get("adminKey", {}).get("existingSecret"):
        del expected[f"{RELEASE}-admin-key"]  # the operator's own: not created
    assert {s["metadata"]["name"]: list(s["data"]) for s in secrets} == {k: [v] for k, v in expected.items()}
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for secret in secrets:
        assert "stringData" not in secret
        (encoded,) = secret["data"].values()
        value = base64.b64decode(encoded).decode()
        assert re.fullmatch(r"[A-Za-z0-9]{48}", value)  # the entrypoint accepts it as a key
        assert value not in others and encoded not in others
    # values.yaml names Secrets, never holds a value (the schema refuses any other key under `security`).
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert all(set(entry) == {"existingSecret", "secretKey"} for entry in defaults["security"].values())
    assert all("valueFrom" in env and "value" not in env for env in defaults["milvus"]["standalone"]["extraEnv"])


def test_created_secrets_are_fresh_per_render(chart: Any) -> None:
    """randAlphaNum: two installs do not share a key (an upgrade keeps the installed one through `lookup`)."""
    keys = [
        only(render(chart, values_of("single-gpu")), "Secret", f"{RELEASE}-admin-key")["data"]["admin-key"]
        for _ in range(2)
    ]
    assert keys[0] != keys[1]
    assert "lookup" in (CHART / "templates" / "secret.yaml").read_text()


def _policy(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return only(docs, "NetworkPolicy", RELEASE)["spec"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_network_policy_admits_the_gateway_and_monitoring_only(
    rendered_sets: dict[str, list[dict[str, Any]]], value_set: str
) -> None:
    docs = rendered_sets[value_set]
    policy = _policy(docs)
    assert policy["podSelector"]["matchLabels"] == _deployment(docs)["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    for rule in policy["ingress"]:
        assert rule["from"], "a rule without peers admits everyone"
    by_ports = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in policy["ingress"]}
    gateway = values_of(value_set).get("networkPolicy", {}).get("gateway", [])
    if gateway:
        assert by_ports.pop(("http", "grpc")) == gateway
    assert by_ports == {
        ("metrics",): [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    }
    container_ports = {p["name"] for p in _pod(docs)["containers"][0]["ports"]}
    assert {"http", "grpc", "metrics"} == container_ports


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_network_policy_egress_is_dns_and_milvus_only(
    rendered_sets: dict[str, list[dict[str, Any]]], value_set: str
) -> None:
    docs = rendered_sets[value_set]
    egress = _policy(docs)["egress"]
    dns, *rest = egress
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    extra = values_of(value_set).get("networkPolicy", {}).get("extraEgress", [])
    milvus_rules = rest[: len(rest) - len(extra)]
    assert rest[len(milvus_rules) :] == extra
    uri = _env(_pod(docs)["containers"][0])["NIRVANA_MILVUS_URI"]
    if not uri:  # milvus-lite: no Milvus server to reach
        assert milvus_rules == []
        return
    (milvus,) = milvus_rules
    assert milvus["ports"] == [{"port": 19530, "protocol": "TCP"}]
    if value_set == "milvus-dependency":
        assert milvus["to"] == [
            {
                "podSelector": {
                    "matchLabels": {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/name": "milvus"}
                }
            }
        ]
        guard = only(docs, "NetworkPolicy", f"{RELEASE}-milvus")["spec"]
        assert guard["policyTypes"] == ["Ingress"]
        assert guard["ingress"][0]["from"] == [{"podSelector": {"matchLabels": policy_labels(docs)}}]
    else:
        assert milvus["to"] == values_of(value_set)["networkPolicy"]["milvus"]["to"]
        assert not find(docs, "NetworkPolicy", f"{RELEASE}-milvus")


def policy_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    return _deployment(docs)["spec"]["selector"]["matchLabels"]


def test_network_policy_can_be_turned_off(chart: Any) -> None:
    values = _merge(values_of("single-gpu"), {"networkPolicy": {"enabled": False}})
    assert not find(render(chart, values), "NetworkPolicy")


def test_values_and_notes_tell_the_operator_what_to_route(chart: Any) -> None:
    text = (CHART / "values.yaml").read_text()
    assert "`nirvana` and `nirvana_stream`" in text
    notes = chart.render(values=values_of("single-gpu"), name=RELEASE, namespace="ml", is_install=True)
    (notes_text,) = [t for p, t in notes.items() if p.endswith("NOTES.txt")]
    assert "`nirvana` and `nirvana_stream`" in notes_text and "x-nirvana-tenant" in notes_text
    assert "networkPolicy.gateway is empty" in notes_text


def test_the_engine_builder_gets_its_own_measured_memory_and_sdxl_can_ask_for_more(chart: Any) -> None:
    def builder(values: dict[str, Any]) -> dict[str, Any]:
        pod = _pod(render(chart, values))
        return next(c for c in pod["initContainers"] if c["name"] == "build-engines")["resources"]

    default = builder(values_of("single-gpu"))
    assert default["limits"] == {"nvidia.com/gpu": 1, "memory": "24Gi"} and default["requests"]["memory"] == "12Gi"
    sdxl = {"limits": {"nvidia.com/gpu": 1, "memory": "40Gi"}, "requests": {"cpu": "4", "memory": "32Gi"}}
    assert builder(_merge(values_of("single-gpu"), {"modelRepository": {"buildResources": sdxl}})) == sdxl
    assert _pod(render(chart, values_of("single-gpu")))["containers"][0]["resources"]["limits"]["memory"] == "24Gi"
