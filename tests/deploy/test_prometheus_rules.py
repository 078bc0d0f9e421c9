"""The chart's PrometheusRule: `promtool check rules` on its groups, and `promtool test rules` on its alerts.

promtool comes from the Debian package `prometheus` (CI installs it); without it these tests are skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import NAMESPACE, RELEASE, only

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")

LABELS = f'namespace="{NAMESPACE}", job="{RELEASE}-metrics", pod="{RELEASE}-0"'


@pytest.fixture
def rules_file(rendered_sets: dict[str, list[dict[str, Any]]], tmp_path: Path) -> Path:
    """The rule groups of the rendered PrometheusRule, as a Prometheus rule file."""
    rule = only(rendered_sets["four-replicas-external-milvus"], "PrometheusRule")
    path = tmp_path / "nirvana-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def _annotations(rules_file: Path, alert: str, value: str) -> dict[str, str]:
    """The alert's annotations as Prometheus renders them when the expression's value prints as `value`."""
    for group in yaml.safe_load(rules_file.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                return {
                    key: text.replace("{{ $value | humanizePercentage }}", value).replace(
                        '{{ printf "%.0f" $value }}', value
                    )
                    for key, text in rule["annotations"].items()
                }
    raise KeyError(alert)


def test_promtool_accepts_the_rules(rules_file: Path) -> None:
    result = _promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def _series(hits: int, misses: int) -> list[dict[str, str]]:
    """An hour of one pod at 1 request/s of `nirvana`, each waiting 1 s in the queue; per-minute cache counts."""
    return [
        {"series": f"nirvana_cache_hits_total{{{LABELS}}}", "values": f"0+{hits}x60"},
        {"series": f"nirvana_cache_misses_total{{{LABELS}}}", "values": f"0+{misses}x60"},
        {"series": f"nirvana_skipped_steps_total{{{LABELS}}}", "values": "0+10x60"},
        {"series": f"nirvana_unet_steps_total{{{LABELS}}}", "values": "0+30x60"},
        {"series": f'nv_inference_queue_duration_us{{{LABELS}, model="nirvana"}}', "values": "0+60000000x60"},
        {"series": f'nv_inference_request_success{{{LABELS}, model="nirvana"}}', "values": "0+60x60"},
        {"series": f"up{{{LABELS}}}", "values": "1x60"},
    ]


def _sample(record: str, labels: str, value: float) -> dict[str, Any]:
    """A promql_expr_test: the recorded series `record` has `value` after 10 minutes."""
    return {"expr": record, "eval_time": "10m", "exp_samples": [{"labels": record + labels, "value": value}]}


def test_alerts_fire_on_a_cold_cache_and_a_long_queue(rules_file: Path, tmp_path: Path) -> None:
    warning = {"severity": "warning"}
    tests = [
        {
            "interval": "1m",
            "input_series": _series(hits=1, misses=99),
            "promql_expr_test": [
                _sample("nirvana:cache_hit_ratio:rate5m", "", 0.01),
                _sample("nirvana:skipped_steps_ratio:rate5m", "", 0.25),
                _sample(
                    "nirvana:queue_time_us_per_request:rate2m", f'{{namespace="{NAMESPACE}", pod="{RELEASE}-0"}}', 1e6
                ),
            ],
            "alert_rule_test": [
                {
                    "alertname": "NirvanaCacheHitRateLow",
                    "eval_time": "30m",
                    "exp_alerts": [
                        {
                            "exp_labels": warning,
                            "exp_annotations": _annotations(rules_file, "NirvanaCacheHitRateLow", "1%"),
                        }
                    ],
                },
                {
                    "alertname": "NirvanaQueueTimeHigh",
                    "eval_time": "30m",
                    "exp_alerts": [
                        {
                            "exp_labels": warning,
                            "exp_annotations": _annotations(rules_file, "NirvanaQueueTimeHigh", "1000"),
                        }
                    ],
                },
                {"alertname": "NirvanaDown", "eval_time": "30m", "exp_alerts": []},
            ],
        },
        {
            "interval": "1m",
            "input_series": _series(hits=50, misses=50),
            "alert_rule_test": [{"alertname": "NirvanaCacheHitRateLow", "eval_time": "30m", "exp_alerts": []}],
        },
    ]
    test_file = tmp_path / "nirvana-rules-test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(rules_file)], "tests": tests}, sort_keys=False))
    result = _promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
