"""Prometheus collectors on a per-app registry (several apps can live in one process, e.g. in tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER_TENANT = "other"
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# adapter loads take milliseconds: fine buckets there, so p50/p99 can be read against a 5 ms / 20 ms target
_LOAD = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: The `method` label of adapter load metrics: adapters_core's method labels, plus "fusion" (bounded).
LOAD_METHODS = ("seq_bn", "double_seq_bn", "par_bn", "compacter", "compacter++", "bottleneck", "prefix_tuning",
                "lora", "ia3", "mam", "union", "fusion", "other")


@dataclass
class Metrics:
    """All adapterserve_* collectors; `tenant_label` keeps tenant cardinality bounded."""

    known_tenants: set[str] = field(default_factory=set)
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        p = "adapterserve_"
        self.requests = Counter(p + "requests", "HTTP requests by route template and status", ["route", "status"], registry=r)
        self.request_seconds = Histogram(p + "request_seconds", "HTTP request latency", ["route"], buckets=_LATENCY, registry=r)
        self.queue_seconds = Histogram(p + "queue_seconds", "Time an inference request waited in the queue", buckets=_LATENCY, registry=r)
        self.inference_seconds = Histogram(p + "inference_seconds", "Time the model took for one batch (one forward pass, or one per length bucket)", buckets=_LATENCY, registry=r)
        self.batch_size = Histogram(p + "batch_size", "Rows (inputs) per batch", buckets=_SIZES, registry=r)
        self.batch_distinct_adapters = Histogram(
            p + "batch_distinct_adapters", "Distinct adapter versions per batch", buckets=_SIZES, registry=r
        )
        self.queue_depth = Gauge(p + "queue_depth", "Inference requests waiting in the queue", registry=r)
        self.adapters_resident = Gauge(p + "adapters_resident", "Adapters loaded into the model", registry=r)
        self.adapter_cache_bytes = Gauge(p + "adapter_cache_bytes", "Bytes of adapter weights loaded into the model", registry=r)
        self.adapter_loads = Counter(p + "adapter_loads", "Adapter loads into the model by result and method", ["result", "method"], registry=r)
        self.adapter_load_seconds = Histogram(p + "adapter_load_seconds", "Time to load one adapter (read, check, build, copy), by method", ["method"], buckets=_LOAD, registry=r)
        self.adapter_read_ahead = Counter(p + "adapter_read_ahead", "Adapter loads whose files a side thread had read while forward passes ran (hit) or that read them on the inference thread (miss)", ["result"], registry=r)
        self.adapter_evictions = Counter(p + "adapter_evictions", "Adapters unloaded to make room in the adapter cache, by method", ["method"], registry=r)
        self.tenant_requests = Counter(p + "tenant_requests", "API requests per tenant (tenants from the keys file only)", ["tenant"], registry=r)
        self.in_flight = Gauge(p + "requests_in_flight", "API (/v1) requests being handled now", registry=r)
        self.worker_restarts = Counter(p + "inference_worker_restarts", "Times the inference worker process died and was started again", registry=r)
        self.draining = Gauge(p + "draining", "1 while the server drains before exiting", registry=r)
        self.ttft_seconds = Histogram(p + "generation_ttft_seconds", "Time from a generation request's arrival to its first token", buckets=_LATENCY, registry=r)
        self.inter_token_seconds = Histogram(p + "generation_inter_token_seconds", "Time between consecutive tokens of one sequence", buckets=_LATENCY, registry=r)
        self.generated_tokens = Counter(p + "generated_tokens", "Tokens generated", registry=r)
        self.tenant_generated_tokens = Counter(p + "tenant_generated_tokens", "Tokens generated per tenant (tenants from the keys file only)", ["tenant"], registry=r)
        self.sequences_running = Gauge(p + "generation_running_sequences", "Sequences holding KV cache (prefilling or decoding)", registry=r)
        self.sequences_waiting = Gauge(p + "generation_waiting_sequences", "Sequences waiting for room in the KV cache", registry=r)
        self.kv_cache_bytes = Gauge(p + "kv_cache_bytes", "Bytes of KV cache allocated for running sequences", registry=r)
        self.kv_cache_used_bytes = Gauge(p + "kv_cache_used_bytes", "Bytes of the allocated KV cache that running sequences hold (their prefixes and tokens so far)", registry=r)
        for method in LOAD_METHODS:  # every series exists from the start, so increase() sees a first error
            for result in ("ok", "error"):
                self.adapter_loads.labels(result=result, method=method)

    @staticmethod
    def method_label(method: str) -> str:
        """The `method` label for an adapter's method label (anything unforeseen is "other")."""
        return method if method in LOAD_METHODS else "other"

    def tenant_label(self, tenant: str) -> str:
        """The label value for a tenant: itself if it is a configured tenant, else 'other'."""
        return tenant if tenant in self.known_tenants else OTHER_TENANT

    def render(self) -> bytes:
        """The text exposition format 0.0.4."""
        return generate_latest(self.registry)
