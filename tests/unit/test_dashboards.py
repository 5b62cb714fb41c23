"""The Grafana dashboard and Prometheus alert rules under ``infra/`` use only fleet's metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "fleet-dashboard.json"
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"

GAUGES_AND_COUNTERS = {
    "fleet_queue_depth",
    "fleet_queue_oldest_age_seconds",
    "fleet_workers",
    "fleet_instances",
    "fleet_spend_usd_per_hour",
    "fleet_spend_usd_total",
    "fleet_tasks_total",
    "fleet_autoscaler_decisions_total",
    "fleet_provider_errors_total",
}
HISTOGRAMS = {"fleet_task_wait_seconds", "fleet_task_duration_seconds", "fleet_task_cost_usd"}
KNOWN_METRICS = GAUGES_AND_COUNTERS | {
    f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
# Aggregation modifiers whose parenthesised argument is a list of label names.
_LABEL_LISTS = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "offset", "bool"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan", "atan2"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric-looking identifiers in a PromQL expression: not strings, labels, functions or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges, subqueries, $__rate_interval
    text = _LABEL_LISTS.sub(" ", text)
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables
    text = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", " ", text)  # numbers
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end() :].lstrip()
        if rest.startswith("("):  # a function call
            continue
        if m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def balanced(expr: str) -> bool:
    """Brackets of every kind nest properly (outside string literals)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _dashboard()["panels"] for t in p["targets"]]


# --- the checker itself ------------------------------------------------------------------


def test_metric_names_ignores_functions_labels_and_keywords():
    expr = (
        'histogram_quantile(0.95, sum by (accelerator, le) (rate(fleet_task_duration_seconds_bucket{accelerator=~"$accelerator"}[$__rate_interval])))'
        " / on (pool) group_left fleet_workers unless fleet_instances > 0"
    )
    assert metric_names(expr) == {
        "fleet_task_duration_seconds_bucket",
        "fleet_workers",
        "fleet_instances",
    }


def test_metric_names_catches_foreign_metrics():
    assert metric_names("sum(up) + rate(node_cpu_seconds_total[5m])") == {
        "up",
        "node_cpu_seconds_total",
    }


def test_balanced_detects_mismatch():
    assert balanced('sum(rate(x{a="("}[5m]))')
    assert not balanced("sum(rate(x[5m))")
    assert not balanced("sum(x")


# --- Grafana -----------------------------------------------------------------------------


def test_dashboard_top_level():
    dash = _dashboard()
    for key in ("title", "panels", "schemaVersion", "templating", "uid"):
        assert key in dash, key
    assert dash["schemaVersion"] == 39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("pool", "accelerator"):
        assert variables[name]["type"] == "query"
        assert "label_values(fleet_" in variables[name]["definition"]
        assert variables[name]["definition"].endswith(f", {name})")
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_every_panel_is_complete_and_uses_only_fleet_metrics():
    panels = _dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        title = panel["title"]
        assert panel.get("type"), title
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), title
        assert panel["datasource"]["uid"] == "${datasource}", title
        assert panel["targets"], title
        for target in panel["targets"]:
            expr = target["expr"]
            assert balanced(expr), (title, expr)
            names = metric_names(expr)
            assert names, (title, expr)
            assert names <= KNOWN_METRICS, (title, names - KNOWN_METRICS)


def test_panels_do_not_overlap():
    cells: set[tuple[int, int]] = set()
    for panel in _dashboard()["panels"]:
        g = panel["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, panel["title"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells |= mine


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("queue depth ready", r'fleet_queue_depth\{[^}]*state="ready"'),
        ("queue depth unacked", r'fleet_queue_depth\{[^}]*state="unacked"'),
        ("oldest age", r"fleet_queue_oldest_age_seconds"),
        ("workers emulated vs real", r'fleet_workers\{[^}]*emulated="true"'),
        ("instances by pool and market", r"by \(pool, market\) \(fleet_instances"),
        ("spend per hour by pool", r"by \(pool\) \(fleet_spend_usd_per_hour"),
        ("cumulative spend", r"fleet_spend_usd_total"),
        (
            "p50 by accelerator",
            r"histogram_quantile\(0\.5, sum by \(accelerator, le\) \(rate\(fleet_task_duration_seconds_bucket",
        ),
        (
            "p95 by accelerator",
            r"histogram_quantile\(0\.95, sum by \(accelerator, le\) \(rate\(fleet_task_duration_seconds_bucket",
        ),
        ("wait p95", r"histogram_quantile\(0\.95, [^\n]*fleet_task_wait_seconds_bucket"),
        (
            "cost per task",
            r"rate\(fleet_task_cost_usd_sum[^\n]*/ sum by \(accelerator\) \(rate\(fleet_task_cost_usd_count",
        ),
        ("autoscaler decisions", r"fleet_autoscaler_decisions_total"),
        ("provider errors by kind", r"by \(provider, kind\) [^\n]*fleet_provider_errors_total"),
        ("dead letters", r'fleet_queue_depth\{queue="fleet\.dead-letter"\}'),
    ],
)
def test_dashboard_covers(what, pattern):
    exprs = "\n".join(expr for _, expr in _panel_exprs())
    assert re.search(pattern, exprs), what


def test_template_variables_are_used():
    exprs = "\n".join(expr for _, expr in _panel_exprs())
    assert '"$pool"' in exprs
    assert '"$accelerator"' in exprs


# --- Prometheus --------------------------------------------------------------------------

ALERT_NAMES = {
    "BacklogGrowingNoCapacity",
    "SpendAboveBudget",
    "WorkersDown",
    "DeadLettersAppearing",
    "ProviderErrorsHigh",
}


def test_alert_rules_are_complete():
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["groups"]
    for group in doc["groups"]:
        assert group["name"]
        assert group["rules"]
    rules = _rules()
    for rule in rules:
        name = rule["alert"]
        assert isinstance(rule["expr"], str), name
        assert rule["expr"].strip(), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert set(names) >= ALERT_NAMES


def test_alert_exprs_are_plausible_and_use_only_fleet_metrics():
    for rule in _rules():
        expr = rule["expr"]
        assert balanced(expr), rule["alert"]
        names = metric_names(expr)
        assert names, rule["alert"]
        assert names <= KNOWN_METRICS, (rule["alert"], names - KNOWN_METRICS)


def test_alert_semantics():
    rules = {r["alert"]: r for r in _rules()}
    backlog = rules["BacklogGrowingNoCapacity"]["expr"]
    assert "deriv(" in backlog
    assert "[10m:1m]" in backlog
    assert "unless on (accelerator)" in backlog
    assert 'state="ready"' in backlog
    assert "fleet_workers" in backlog
    workers_down = rules["WorkersDown"]
    assert workers_down["for"] == "5m"
    assert "fleet_workers" in workers_down["expr"]
    assert "fleet_queue_depth" in workers_down["expr"]
    dead = rules["DeadLettersAppearing"]["expr"]
    assert 'fleet_queue_depth{queue="fleet.dead-letter"}' in dead
    spend = rules["SpendAboveBudget"]
    assert re.search(r"sum\(fleet_spend_usd_per_hour\) > \d+", spend["expr"])
    assert "placeholder" in spend["annotations"]["description"].lower()
    assert "fleet_provider_errors_total" in rules["ProviderErrorsHigh"]["expr"]


def test_queue_regex_extracts_the_accelerator():
    """The label_replace regex maps every queue shape to its accelerator (RE2 is anchored)."""
    expr = _rules()[0]["expr"]
    m = re.search(r'"queue", "((?:[^"\\]|\\.)*)"', expr)
    assert m
    regex = m.group(1).replace("\\\\", "\\")  # PromQL string escapes -> the regex itself
    cases = {
        "inference.nvidia-l4": "nvidia-l4",
        "inference.nvidia-h200.x8": "nvidia-h200",
        "fine_tune.amd-mi300x.x4": "amd-mi300x",
        "staging.embedding.google-tpu-v5e": "google-tpu-v5e",
        "embedding.cpu": "cpu",
    }
    for queue, accelerator in cases.items():
        found = re.fullmatch(regex, queue)
        assert found, queue
        assert found.group(1) == accelerator, queue
    assert re.fullmatch(regex, "fleet.dead-letter") is None


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH")
def test_promtool_check_rules():
    promtool = shutil.which("promtool")
    assert promtool
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
