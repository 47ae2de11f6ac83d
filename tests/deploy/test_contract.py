"""The deploy files speak the server's language: the ADAPTERSERVE_* settings it reads and the
adapterserve_* metrics it exports. Checked against the server code and against the names the
deployment issue fixed."""

from __future__ import annotations

import re

import pytest

from server.metrics import Metrics
from server.settings import Settings

from .conftest import DEPLOY, OVERLAYS, REPO, docs
from .test_manifests import env_of

# The settings contract (issue 5 / DESIGN.md section 3).
SETTINGS = {
    "ADAPTERSERVE_HOST", "ADAPTERSERVE_PORT", "ADAPTERSERVE_MODEL_PATH", "ADAPTERSERVE_DEVICE",
    "ADAPTERSERVE_DTYPE", "ADAPTERSERVE_STORE_DIR", "ADAPTERSERVE_ADAPTER_CACHE_MB",
    "ADAPTERSERVE_MAX_BATCH_SIZE", "ADAPTERSERVE_MAX_BATCH_TOKENS", "ADAPTERSERVE_MAX_WAIT_MS",
    "ADAPTERSERVE_QUEUE_SIZE", "ADAPTERSERVE_REQUEST_TIMEOUT_S", "ADAPTERSERVE_API_KEYS_FILE",
    "ADAPTERSERVE_MAX_UPLOAD_MB", "ADAPTERSERVE_MAX_INPUTS", "ADAPTERSERVE_MAX_INPUT_TOKENS",
    "ADAPTERSERVE_TENANT_MAX_ADAPTERS", "ADAPTERSERVE_DRAIN_TIMEOUT_S", "ADAPTERSERVE_LOG_LEVEL",
    "ADAPTERSERVE_TENANT_MAX_STORE_MB", "ADAPTERSERVE_TORCH_THREADS", "ADAPTERSERVE_SWITCH_INTERVAL_MS",
    "ADAPTERSERVE_INFERENCE_WORKER", "ADAPTERSERVE_LENGTH_BUCKETS", "ADAPTERSERVE_STACK_CACHE_MB", "ADAPTERSERVE_FORWARD_LANES",
    # request limits and slow-client deadlines (issue 12)
    "ADAPTERSERVE_MAX_COMPOSITION_DEPTH", "ADAPTERSERVE_MAX_COMPOSITION_WIDTH", "ADAPTERSERVE_MAX_ADAPTER_APPLICATIONS",
    "ADAPTERSERVE_MAX_REQUEST_COST", "ADAPTERSERVE_MAX_RESPONSE_VALUES", "ADAPTERSERVE_MAX_JSON_DEPTH",
    "ADAPTERSERVE_TOKENIZE_THREADS", "ADAPTERSERVE_HEADER_TIMEOUT_S", "ADAPTERSERVE_BODY_TIMEOUT_S",
    "ADAPTERSERVE_MIN_BODY_RATE_KIB_S",
    # generation (issues 13-14)
    "ADAPTERSERVE_KV_CACHE_MB", "ADAPTERSERVE_MAX_RUNNING_SEQUENCES", "ADAPTERSERVE_GENERATION_QUEUE_SIZE",
    "ADAPTERSERVE_PREFILL_CHUNK_TOKENS", "ADAPTERSERVE_MAX_NEW_TOKENS",
}
# The metrics contract, as exposed sample names (counters end in _total, histograms expose
# _bucket/_sum/_count). adapterserve_draining is the server's drain gauge.
COUNTERS = {"requests", "adapter_loads", "adapter_evictions", "adapter_read_ahead", "tenant_requests", "inference_worker_restarts",
            "generated_tokens", "tenant_generated_tokens"}
HISTOGRAMS = {"request_seconds", "queue_seconds", "inference_seconds", "batch_size",
              "batch_distinct_adapters", "adapter_load_seconds", "generation_ttft_seconds", "generation_inter_token_seconds"}
GAUGES = {"queue_depth", "adapters_resident", "adapter_cache_bytes", "draining", "requests_in_flight",
          "generation_running_sequences", "generation_waiting_sequences", "kv_cache_bytes", "kv_cache_used_bytes"}

SETTING_RE = re.compile(r"\bADAPTERSERVE_[A-Z0-9_]*[A-Z0-9]\b")
METRIC_RE = re.compile(r"\badapterserve_[a-z0-9_]*[a-z0-9]\b")


def sample_names(counters, histograms, gauges) -> set[str]:
    """Exposed sample names, plus histogram family names (prose and docs name the family)."""
    names = {f"adapterserve_{c}_total" for c in counters}
    for h in histograms:
        names |= {f"adapterserve_{h}"} | {f"adapterserve_{h}_{s}" for s in ("bucket", "sum", "count")}
    return names | {f"adapterserve_{g}" for g in gauges}


def deploy_texts() -> dict[str, str]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".env", ".sh", ".py")]
    files += [REPO / "Dockerfile", REPO / "docs" / "operations.md"]
    return {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in files if p.exists()}


def server_settings_class():
    return Settings


def server_sample_names() -> set[str]:
    text = Metrics().render().decode()
    counters, histograms, gauges = set(), set(), set()
    for name, kind in re.findall(r"^# TYPE (adapterserve_\w+) (\w+)$", text, re.M):
        base = name.removeprefix("adapterserve_")
        if kind == "counter":
            base = base.removesuffix("_total")
        if base.endswith("_created"):
            continue
        {"counter": counters, "histogram": histograms, "gauge": gauges}.get(kind, set()).add(base)
    return sample_names(counters, histograms, gauges)


def test_deploy_files_use_only_contract_settings():
    unknown = {f"{path}: {name}" for path, text in deploy_texts().items()
               for name in SETTING_RE.findall(text) if name not in SETTINGS}
    assert not unknown, sorted(unknown)


def test_deploy_settings_are_fields_of_the_server_settings():
    fields = {f"ADAPTERSERVE_{name.upper()}" for name in server_settings_class().model_fields}
    used = {name for text in deploy_texts().values() for name in SETTING_RE.findall(text)}
    assert used <= fields, sorted(used - fields)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_accepts_the_rendered_environment(build, overlay, monkeypatch):
    """The env each overlay gives the container parses in the server's Settings, and the server
    agrees to bind 0.0.0.0 with it (an API keys file is configured)."""
    settings_cls = server_settings_class()
    env = {k: v for k, v in env_of(docs(build(overlay))).items() if k.startswith("ADAPTERSERVE_")}
    import os

    for key in list(os.environ):
        if key.startswith("ADAPTERSERVE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = settings_cls()
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert not settings.open_mode
    settings.check_bind()
    assert float(settings.drain_timeout_s) == float(env["ADAPTERSERVE_DRAIN_TIMEOUT_S"])


def test_deploy_files_use_only_contract_metrics():
    known = sample_names(COUNTERS, HISTOGRAMS, GAUGES)
    unknown = {f"{path}: {name}" for path, text in deploy_texts().items()
               for name in METRIC_RE.findall(text) if name not in known}
    assert not unknown, sorted(unknown)


def test_deploy_metrics_are_exported_by_the_server():
    exported = server_sample_names()
    used = {name for text in deploy_texts().values() for name in METRIC_RE.findall(text)}
    assert used <= exported, sorted(used - exported)
