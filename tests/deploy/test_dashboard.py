"""The Grafana dashboard: valid JSON, the panels operations needs, and PromQL that parses."""

from __future__ import annotations

import json

import yaml

from .conftest import DEPLOY, out, run, tool

DASHBOARD = DEPLOY / "grafana" / "adapterserve-dashboard.json"

# Panel topic -> a metric that panel must query.
REQUIRED = {
    "throughput": "adapterserve_requests_total",
    "latency percentiles": "adapterserve_request_seconds_bucket",
    "batch size": "adapterserve_batch_size_bucket",
    "distinct adapters per batch": "adapterserve_batch_distinct_adapters_bucket",
    "queue depth": "adapterserve_queue_depth",
    "cache residency": "adapterserve_adapters_resident",
    "cache bytes": "adapterserve_adapter_cache_bytes",
    "adapter loads": "adapterserve_adapter_loads_total",
    "errors by status": "sum by (status)",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict) -> list[dict]:
    return [p for p in d["panels"] if p.get("type") != "row"]


def exprs(d: dict) -> list[str]:
    return [t["expr"] for p in panels(d) for t in p.get("targets", [])]


def test_dashboard_structure():
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for p in panels(d):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]


def test_dashboard_covers_the_operations_topics():
    all_exprs = "\n".join(exprs(dashboard()))
    missing = [topic for topic, needle in REQUIRED.items() if needle not in all_exprs]
    assert not missing, missing
    # Latency shows several percentiles.
    for q in ("histogram_quantile(0.5,", "histogram_quantile(0.9,", "histogram_quantile(0.99,"):
        assert q in all_exprs


def test_dashboard_promql_parses(tmp_path):
    """promtool has no bare PromQL check; each panel query becomes a recording rule it parses."""
    rules = []
    for i, expr in enumerate(exprs(dashboard())):
        concrete = (expr.replace("$__rate_interval", "5m")
                    .replace("$namespace", ".*").replace("$pod", ".*"))
        assert "$" not in concrete, f"unsubstituted variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run([tool("promtool"), "check", "rules", str(path)])
    assert proc.returncode == 0, out(proc)
