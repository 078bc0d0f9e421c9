"""The Helm chart (deploy/helm/nirvana): lint, render for the acceptance value sets, validate every manifest.

Kubernetes objects are validated with kubernetes-validate in strict mode (unknown fields are errors) for each
version in KUBE_VERSIONS. The Prometheus Operator's kinds have no schema there: they are checked against the
subset of their CRD schema the chart uses. The Milvus dependency cannot be downloaded here, so the
`milvus-dependency` set renders this chart's objects with `milvus.enabled: true` and the subchart absent; once
`helm dependency update` has vendored it into charts/, the same test also finds the Milvus objects.
"""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_helpers import CHART, KUBE_VERSIONS, RELEASE, VALUE_SETS, find, only, values_of

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
