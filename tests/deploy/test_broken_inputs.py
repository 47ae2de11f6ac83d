"""Each validator must reject a deliberately broken input: a check that cannot fail proves nothing."""

from __future__ import annotations

import shutil
import sys

import yaml

from .conftest import DEPLOY, REPO, SCRIPTS, docs, extract_rules, kustomize, out, run, tool
from .test_alerts import TESTS_FILE


def _mutate_deployment(text: str, mutate) -> str:
    resources = docs(text)
    for r in resources:
        if r["kind"] == "Deployment":
            mutate(r)
    return yaml.safe_dump_all(resources)


def test_kubernetes_validate_rejects_a_misspelled_probe_field(build):
    def typo(dep):
        probe = dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]
        probe["paht"] = probe.pop("path")

    broken = _mutate_deployment(build("cpu"), typo)
    proc = run([tool("kubernetes-validate"), "--strict", "-"], stdin=broken)
    assert proc.returncode != 0, out(proc)
    assert "'paht' was unexpected" in proc.stdout


def test_kubernetes_validate_rejects_a_wrong_type(build):
    def bad(dep):
        dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "forty-five"

    proc = run([tool("kubernetes-validate"), "--strict", "-"], stdin=_mutate_deployment(build("cpu"), bad))
    assert proc.returncode != 0, out(proc)
    assert "terminationGracePeriodSeconds" in proc.stdout


def test_kustomize_rejects_a_missing_resource(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - missing.yaml\n"
    )
    proc = run([tool("kubectl"), "kustomize", str(tmp_path)])
    assert proc.returncode != 0, out(proc)


def test_crd_schema_rejects_a_broken_service_monitor(tmp_path):
    sm = yaml.safe_load((DEPLOY / "k8s" / "base" / "servicemonitor.yaml").read_text())
    sm["spec"]["endpoints"][0]["scrapeTimeot"] = "10s"  # typo
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"  # not a Prometheus duration
    proc = run([sys.executable, str(SCRIPTS / "validate-crds.py"), "-"], stdin=yaml.safe_dump(sm))
    assert proc.returncode == 1, out(proc)
    assert "'scrapeTimeot' was unexpected" in proc.stdout
    assert "interval" in proc.stdout


def test_crd_schema_rejects_a_rule_without_expr():
    rule = yaml.safe_load((DEPLOY / "k8s" / "base" / "prometheusrule.yaml").read_text())
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    proc = run([sys.executable, str(SCRIPTS / "validate-crds.py"), "-"], stdin=yaml.safe_dump(rule))
    assert proc.returncode == 1, out(proc)
    assert "'expr' is a required property" in proc.stdout


def test_promtool_check_rejects_broken_promql(tmp_path):
    rules = tmp_path / "broken.rules.yaml"
    rules.write_text(
        "groups:\n"
        "  - name: broken\n"
        "    rules:\n"
        "      - alert: Broken\n"
        "        expr: sum(rate(adapterserve_requests_total[5m]) > 1\n"
    )
    proc = run([tool("promtool"), "check", "rules", str(rules)])
    assert proc.returncode != 0, out(proc)


def test_promtool_unit_tests_catch_a_weakened_alert(tmp_path):
    """Raise the error-rate threshold from 5% to 50%: the unit test for that alert must fail."""
    good = extract_rules(tmp_path / "good.rules.yaml").read_text()
    assert ") > 0.05" in good
    (tmp_path / "adapterserve.rules.yaml").write_text(good.replace(") > 0.05", ") > 0.5"))
    shutil.copy(TESTS_FILE, tmp_path / TESTS_FILE.name)
    proc = run([tool("promtool"), "test", "rules", str(tmp_path / TESTS_FILE.name)])
    assert proc.returncode != 0, out(proc)
    assert "AdapterServeHighErrorRate" in proc.stdout + proc.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\n"
        "RUN apt-get update && apt-get install -y curl\n"
        "RUN pip install torch\n"
        "CMD adapterserve serve\n"
    )
    proc = run([tool("hadolint"), "--no-color", str(bad)])
    assert proc.returncode != 0, out(proc)
    for rule in ("DL3007", "DL3008", "DL3013", "DL3025"):
        assert rule in proc.stdout, rule


def test_yamllint_rejects_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nenabled: yes\n")
    proc = run([tool("yamllint"), "-s", "-c", str(DEPLOY / "yamllint.yaml"), str(bad)])
    assert proc.returncode != 0, out(proc)
    assert "duplication of key" in proc.stdout and "truthy" in proc.stdout


def test_overlay_build_fails_when_the_base_patch_target_is_gone(tmp_path):
    """A patch for a Deployment that is not in the resources is an error, not a silent no-op."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "kustomization.yaml").write_text("resources: []\n")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    shutil.copy(REPO / "deploy/k8s/overlays/cpu/deployment-patch.yaml", overlay)
    (overlay / "kustomization.yaml").write_text("resources:\n  - ../base\npatches:\n  - path: deployment-patch.yaml\n")
    proc = run([tool("kubectl"), "kustomize", str(overlay)])
    assert proc.returncode != 0, out(proc)
    # ...while the real overlay still builds.
    assert "kind: Deployment" in kustomize(DEPLOY / "k8s" / "overlays" / "cpu")
