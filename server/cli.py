"""`adapterserve serve` (uvicorn with a graceful drain on SIGTERM) and small admin commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from server.http.auth import hash_key, parse_keys
from server.http.read_deadlines import header_deadline_protocol
from server.settings import Settings

log = logging.getLogger("adapterserve")

# flag -> settings field
_FLAGS: dict[str, str] = {
    "--host": "host", "--port": "port", "--model": "model_path", "--store": "store_dir", "--device": "device",
    "--dtype": "dtype", "--api-keys-file": "api_keys_file", "--adapter-cache-mb": "adapter_cache_mb",
    "--stack-cache-mb": "stack_cache_mb",
    "--max-batch-size": "max_batch_size", "--max-batch-tokens": "max_batch_tokens", "--max-wait-ms": "max_wait_ms",
    "--queue-size": "queue_size", "--request-timeout-s": "request_timeout_s", "--max-upload-mb": "max_upload_mb",
    "--max-inputs": "max_inputs", "--max-input-tokens": "max_input_tokens", "--tenant-max-adapters": "tenant_max_adapters",
    "--drain-timeout-s": "drain_timeout_s", "--log-level": "log_level", "--torch-threads": "torch_threads",
    "--forward-lanes": "forward_lanes",
    "--switch-interval-ms": "switch_interval_ms", "--inference-worker": "inference_worker",
    "--length-buckets": "length_buckets", "--max-composition-depth": "max_composition_depth",
    "--max-composition-width": "max_composition_width", "--max-adapter-applications": "max_adapter_applications",
    "--max-request-cost": "max_request_cost", "--max-response-values": "max_response_values",
    "--max-json-depth": "max_json_depth", "--tokenize-threads": "tokenize_threads",
    "--header-timeout-s": "header_timeout_s", "--body-timeout-s": "body_timeout_s",
    "--min-body-rate-kib-s": "min_body_rate_kib_s",
    "--kv-cache-mb": "kv_cache_mb", "--max-running-sequences": "max_running_sequences",
    "--generation-queue-size": "generation_queue_size", "--prefill-chunk-tokens": "prefill_chunk_tokens",
    "--max-new-tokens": "max_new_tokens",
}
KEEP_ALIVE_S = 75  # above the idle timeout of common proxies and load balancers (nginx upstream keepalive: 60 s)


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How `serve` runs the app (the test servers too): httptools with the header deadline, keep-alive, and a
    graceful shutdown that outlasts the drain."""
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level, "lifespan": "on",
        "http": header_deadline_protocol(settings.header_timeout_s),
        "timeout_graceful_shutdown": int(settings.drain_timeout_s) + 1, "timeout_keep_alive": KEEP_ALIVE_S,
        "access_log": settings.log_level in ("debug", "trace"),
    }
    return uvicorn.Config(app, **(options | overrides))


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains (readyz 503, new work 503, queued work finishes),
    then exits 0; a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._app = app
        self._drain_task: asyncio.Task[None] | None = None
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown (exit code -15).
        if self._draining or self._loop is None or self.should_exit:
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        log.info("signal %s: draining (DRAIN_TIMEOUT_S=%.0f)", signal.Signals(sig).name, self._app.state.settings.drain_timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        from server.http.app import drain

        done = await drain(self._app)
        log.info("drained (%s); shutting down", "all requests finished" if done else "timeout")
        self.should_exit = True


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    for flag, field in _FLAGS.items():
        p.add_argument(flag, dest=field, default=None, help=f"env ADAPTERSERVE_{field.upper()}")


def serve(args: argparse.Namespace) -> int:
    overrides = {f: getattr(args, f) for f in _FLAGS.values() if getattr(args, f) is not None}
    try:
        settings = Settings(**overrides)
        settings.check_bind()
    except ValueError as exc:
        print(f"adapterserve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.http.app import create_app

    if settings.switch_interval_ms > 0:
        sys.setswitchinterval(settings.switch_interval_ms / 1000.0)

    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app)
    server.run()
    return 0 if server.started else 1


def hash_key_cmd(args: argparse.Namespace) -> int:
    key = args.key if args.key != "-" else sys.stdin.readline().strip()
    if not key:
        print("adapterserve: empty key", file=sys.stderr)
        return 2
    digest = hash_key(key)
    if args.tenant:
        print(json.dumps({"sha256": digest, "tenant": args.tenant, "role": args.role}))
    else:
        print(digest)
    return 0


def check_keys_cmd(args: argparse.Namespace) -> int:
    try:
        entries = parse_keys(json.loads(Path(args.path).read_text()), args.path)
    except (OSError, ValueError) as exc:
        print(f"adapterserve: {exc}", file=sys.stderr)
        return 1
    print(f"{len(entries)} keys, tenants: {', '.join(sorted({e.tenant for e in entries}))}")
    return 0


def convert_cmd(args: argparse.Namespace) -> int:
    from server.execution.builtin_models import convert_smollm2

    try:
        dest = convert_smollm2(Path(args.dest) if args.dest else None, force=args.force)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"adapterserve: {exc}", file=sys.stderr)
        return 1
    print(dest)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapterserve", description="Serve many adapters from one backbone.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the HTTP server")
    _add_serve_flags(p_serve)
    p_serve.set_defaults(func=serve)
    p_hash = sub.add_parser("hash-key", help="print the sha256 of an API key for the keys file ('-' reads stdin)")
    p_hash.add_argument("key")
    p_hash.add_argument("--tenant", help="print a whole keys-file entry for this tenant")
    p_hash.add_argument("--role", choices=("tenant", "admin"), default="tenant")
    p_hash.set_defaults(func=hash_key_cmd)
    p_check = sub.add_parser("check-keys", help="validate a keys file")
    p_check.add_argument("path")
    p_check.set_defaults(func=check_keys_cmd)
    p_convert = sub.add_parser("convert", help="convert a built-in model for serving, once (install time)")
    p_convert.add_argument("model", choices=("smollm2",))
    p_convert.add_argument("--dest", help="target folder (default: the built-in model folder)")
    p_convert.add_argument("--force", action="store_true", help="convert again even if already converted")
    p_convert.set_defaults(func=convert_cmd)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
