"""The alerts: promtool check rules, promtool test rules (a unit test per alert), and coverage."""

from __future__ import annotations

import shutil

import pytest
import yaml

from .conftest import DEPLOY, K8S, extract_rules, out, run, tool

TESTS_FILE = DEPLOY / "prometheus" / "alerts.test.yaml"
REQUIRED_ALERTS = {
    "AdapterServeHighErrorRate",  # error rate
    "AdapterServeQueueSaturated",  # queue saturation
    "AdapterServeHighP99Latency",  # p99 latency
    "AdapterServeAdapterLoadFailures",  # adapter load failures
    "AdapterServeReplicasNotReady",  # replicas not ready
}


def rule_alerts() -> list[dict]:
    rule = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


@pytest.fixture()
def rules_dir(tmp_path):
    """A temp dir with the extracted rules file and the unit tests next to it."""
    extract_rules(tmp_path / "adapterserve.rules.yaml")
    shutil.copy(TESTS_FILE, tmp_path / TESTS_FILE.name)
    return tmp_path


def test_promtool_check_rules(rules_dir):
    proc = run([tool("promtool"), "check", "rules", str(rules_dir / "adapterserve.rules.yaml")])
    assert proc.returncode == 0, out(proc)
    assert f"SUCCESS: {len(rule_alerts())} rules found" in proc.stdout + proc.stderr


def test_promtool_test_rules(rules_dir):
    proc = run([tool("promtool"), "test", "rules", str(rules_dir / TESTS_FILE.name)])
    assert proc.returncode == 0, out(proc)
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_unit_test():
    alerts = {r["alert"] for r in rule_alerts()}
    assert REQUIRED_ALERTS <= alerts
    tests = yaml.safe_load(TESTS_FILE.read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert alerts - fired == set(), f"alerts without a firing unit test: {alerts - fired}"
    assert alerts - quiet == set(), f"alerts without a quiet (not firing) case: {alerts - quiet}"


def test_alerts_have_severity_and_runbook():
    for r in rule_alerts():
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert r["annotations"]["runbook"] == f"docs/operations.md#{r['alert'].lower()}"
