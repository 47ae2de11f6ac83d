"""Kustomize builds of every overlay, validated offline: kubernetes-validate --strict for the built-in
kinds (schemas bundled in the PyPI package), deploy/schemas for the Prometheus Operator kinds, and
structural checks of what the server needs (probes, drain, security, mounts, GPU placement)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import (
    CRD_KINDS,
    K8S,
    K8S_VERSIONS,
    OVERLAYS,
    SCRIPTS,
    by_kind,
    docs,
    kustomize,
    one,
    out,
    run,
    tool,
)

BUILT_IN_KINDS = {
    "ConfigMap", "Secret", "Service", "PersistentVolumeClaim", "Deployment",
    "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress",
}


def kubernetes_validate(text: str, version: str | None) -> tuple[int, list[str]]:
    args = [tool("kubernetes-validate"), "--strict"]
    if version:
        args += ["-k", version]
    proc = run(args + ["-"], stdin=text)
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def env_of(resources: list[dict]) -> dict[str, str]:
    """The environment the server process sees: envFrom ConfigMap, then explicit env on top."""
    dep = one(resources, "Deployment")
    c = container(dep)
    cms = {cm["metadata"]["name"]: cm.get("data", {}) for cm in by_kind(resources, "ConfigMap")}
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        name = src["configMapRef"]["name"]
        assert name in cms, f"envFrom references ConfigMap {name} that the build does not contain"
        env.update(cms[name])
    for e in c.get("env", []):
        assert "value" in e, f"env {e['name']} has no literal value"
        env[e["name"]] = e["value"]
    return env


# --------------------------------------------------------------------------- validators


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_overlay_passes_kubernetes_validate_strict(build, overlay, version):
    rc, lines = kubernetes_validate(build(overlay), version)
    assert rc == 0, "\n".join(lines)
    passed = {m.group(1) for line in lines if (m := re.search(r"passed for resource (\S+)", line))}
    warned = [line for line in lines if line.startswith("WARN")]
    resources = docs(build(overlay))
    for r in resources:
        key = f"{r['kind'].lower()}/{r['metadata']['name']}"
        if r["kind"] in CRD_KINDS:
            # Not in kubernetes-validate's bundled schemas: checked by validate-crds.py below.
            assert key not in passed
        else:
            assert r["kind"] in BUILT_IN_KINDS, f"unexpected kind {r['kind']}: add it to a validator"
            assert key in passed, f"{key} was not validated:\n" + "\n".join(lines)
    # The only resources kubernetes-validate may skip are the CRD kinds.
    for line in warned:
        assert any(f"kind {k} " in line for k in CRD_KINDS), line


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_base_builds_and_validates(build, version):
    rc, lines = kubernetes_validate(build("base"), version)
    assert rc == 0, "\n".join(lines)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_custom_resources_match_deploy_schemas(build, overlay):
    args = [sys.executable, str(SCRIPTS / "validate-crds.py"), "-"]
    for kind in CRD_KINDS:
        args += ["--require-kind", kind]
    proc = run(args, stdin=build(overlay))
    assert proc.returncode == 0, out(proc)
    for kind in CRD_KINDS:
        assert f"OK {kind}/adapterserve" in proc.stdout


def test_queue_depth_hpa_component_builds_and_validates(tmp_path):
    """The optional custom-metric HPA (components/hpa-queue-depth) applied on the cpu overlay."""
    # kustomize refuses absolute paths; reach the repo from the temp dir with relative ones.
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel(K8S / "overlays" / "cpu")],
                "components": [rel(K8S / "components" / "hpa-queue-depth")],
            }
        )
    )
    text = kustomize(tmp_path)
    rc, lines = kubernetes_validate(text, None)
    assert rc == 0, "\n".join(lines)
    hpa = one(docs(text), "HorizontalPodAutoscaler")
    kinds = [m["type"] for m in hpa["spec"]["metrics"]]
    assert kinds == ["Resource", "Pods"]
    pods = hpa["spec"]["metrics"][1]["pods"]
    assert pods["metric"]["name"] == "adapterserve_queue_depth"
    assert pods["target"]["type"] == "AverageValue"


# --------------------------------------------------------------------------- what the server needs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_ports_and_drain(build, overlay):
    resources = docs(build(overlay))
    dep = one(resources, "Deployment")
    c = container(dep)
    env = env_of(resources)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(env["ADAPTERSERVE_PORT"]) == 8000
    assert env["ADAPTERSERVE_HOST"] == "0.0.0.0"
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 8000)
    # Grace period covers the preStop pause plus the server's own drain, with margin.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env["ADAPTERSERVE_DRAIN_TIMEOUT_S"])
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + drain + 5, (grace, pre_stop, drain)
    # Rolling updates never drop below the desired count.
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security(build, overlay):
    resources = docs(build(overlay))
    spec = one(resources, "Deployment")["spec"]["template"]["spec"]
    c = container(one(resources, "Deployment"))
    psc, csc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in csc["capabilities"]
    assert spec["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be a writable emptyDir"
    assert "cpu" in c["resources"]["requests"] and "memory" in c["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_store_keys_and_config_are_wired(build, overlay):
    resources = docs(build(overlay))
    spec = one(resources, "Deployment")["spec"]["template"]["spec"]
    c = container(one(resources, "Deployment"))
    env = env_of(resources)
    volumes = {v["name"]: v for v in spec["volumes"]}

    def volume_for(path: str) -> dict:
        best = max((m for m in c["volumeMounts"] if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")),
                   key=lambda m: len(m["mountPath"]))
        return best, volumes[best["name"]]

    # The store lives on the shared ReadWriteMany claim.
    _, store = volume_for(env["ADAPTERSERVE_STORE_DIR"])
    claim = store["persistentVolumeClaim"]["claimName"]
    pvc = one(resources, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    # The keys file comes from the Secret in the build, read-only, not through subPath (so the
    # kubelet's updates reach the server's reload).
    keys_file = env["ADAPTERSERVE_API_KEYS_FILE"]
    mount, keys = volume_for(keys_file)
    assert mount.get("readOnly") is True and "subPath" not in mount
    secret = one(resources, "Secret")
    assert keys["secret"]["secretName"] == secret["metadata"]["name"]
    assert Path(keys_file).name in secret["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_placeholder_api_keys_are_closed(build, overlay):
    import base64
    import json

    secret = one(docs(build(overlay)), "Secret")
    keys = json.loads(base64.b64decode(secret["data"]["api-keys.json"]))
    assert keys["keys"], "an empty keys list would not be what we ship"
    for k in keys["keys"]:
        assert re.fullmatch(r"[0-9a-f]{64}", k["sha256"]) and k["role"] in ("tenant", "admin")
        # The placeholder hash has no known preimage: nobody can use a fresh install until the
        # operator puts real keys in.
        assert set(k["sha256"]) == {"0"}


def test_gpu_overlay_requests_a_gpu_and_schedules_on_gpu_nodes(build):
    resources = docs(build("gpu"))
    spec = one(resources, "Deployment")["spec"]["template"]["spec"]
    c = container(one(resources, "Deployment"))
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    env = env_of(resources)
    assert env["ADAPTERSERVE_DEVICE"] == "cuda"
    assert c["image"].endswith("-cuda")


def test_cpu_overlay_has_no_gpu(build):
    resources = docs(build("cpu"))
    c = container(one(resources, "Deployment"))
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert env_of(resources)["ADAPTERSERVE_DEVICE"] == "cpu"
    assert c["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_ingress_hpa_pdb_point_at_the_pods(build, overlay):
    resources = docs(build(overlay))
    dep = one(resources, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = one(resources, "Service")
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["name"] == "http"

    sm = one(resources, "ServiceMonitor")
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == "http"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"

    ing = one(resources, "Ingress")
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_adapter"
    (path,) = ing["spec"]["rules"][0]["http"]["paths"]
    assert path["path"] == "/v1", "only the API is exposed; /metrics and probes stay in the cluster"
    backend = path["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"] and backend["port"]["name"] == "http"

    hpa = one(resources, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert hpa["spec"]["minReplicas"] >= 2

    pdb = one(resources, "PodDisruptionBudget")
    assert all(pod_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_buffers_slow_clients_and_outwaits_the_server(build, overlay):
    """nginx takes a slow client's whole body before a pod sees it, and waits longer for a pod than the server's
    request timeout, so the server's own 504 answers first (docs/operations.md "Slow clients")."""
    resources = docs(build(overlay))
    notes = one(resources, "Ingress")["metadata"]["annotations"]
    env = env_of(resources)
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "on"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > float(env["ADAPTERSERVE_REQUEST_TIMEOUT_S"])
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{int(float(env['ADAPTERSERVE_MAX_UPLOAD_MB']))}m"
