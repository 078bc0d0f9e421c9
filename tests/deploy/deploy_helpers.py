"""Helpers of the deployment checks: render the Helm chart offline with the Helm SDK (helm-python-sdk).

No cluster and no Docker engine are involved: these tests render, lint and validate files only.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "nirvana"
DOCKER = ROOT / "docker"
RELEASE, NAMESPACE = "nirvana", "ml"
# Kubernetes versions the rendered manifests are validated against: the chart's minimum (Chart.yaml kubeVersion)
# and a recent one.
KUBE_VERSIONS = ("1.27.0", "1.33.0")
# The acceptance value sets: ci/<name>-values.yaml.
VALUE_SETS = ("single-gpu", "four-replicas-external-milvus", "milvus-dependency")


def values_of(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


def tool(name: str) -> str | None:
    """An executable from this venv's bin (pip-installed tools), else from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for `values` (NOTES.txt and empty templates dropped)."""
    rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, rendered {len(found)}"
    return found[0]
