# syntax=docker/dockerfile:1
#
# hero-rewards container images. Two targets:
#
#   docker build --target cuda -t hero-rewards:0.1.0-cuda .   # the deployment: NVIDIA GPU,
#       a Hugging Face reward model mounted read-only at /models/reward-model
#   docker build --target cpu  -t hero-rewards:0.1.0-cpu  .   # anywhere: CPU torch and the
#       embedded all-MiniLM-L6-v2 stand-in RM that ships inside the pip package
#
#   docker run --gpus all -p 8000:8000 -e HERO_API_KEY=... \
#       -v /path/to/Skywork-Reward-Llama-3.1-8B:/models/reward-model:ro hero-rewards:0.1.0-cuda
#   docker run -p 8000:8000 -e HERO_API_KEY=... hero-rewards:0.1.0-cpu
#
# Both run as uid 10001, listen on 0.0.0.0:8000 and so need an API key (HERO_API_KEY or
# HERO_API_KEY_FILE) or an explicit --insecure. Nothing is downloaded at start
# (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1); the root filesystem can be read-only as long as
# /tmp is writable. Every HERO_* variable (see `hero-rewards serve --help`) configures the
# service; flags on the command line win over them.
#
# torch is pinned by constraints.txt (the same file the Makefile uses); the CUDA wheel comes
# from the PyTorch index for CUDA ${TORCH_CUDA}, which must be one the pinned torch release
# publishes. The base images are pinned by tag; pin them by digest in your registry mirror.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG TORCH_CUDA=cu128

# ---------------------------------------------------------------------------------------------
# CPU build: a virtual environment in /opt/venv with CPU-only torch.
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
# torch first, alone, from the CPU index: the wheel without CUDA libraries (~5x smaller).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c constraints.txt \
        --index-url https://download.pytorch.org/whl/cpu torch
COPY pyproject.toml README.md ./
COPY service ./service
COPY clients ./clients
RUN pip install --no-cache-dir -c constraints.txt '.[server]' \
    && python -c "import torch; assert not torch.version.cuda, torch.version.cuda"

# ---------------------------------------------------------------------------------------------
# CUDA base: the distribution Python (3.12 on Ubuntu 24.04). The torch wheel brings its own
# CUDA runtime libraries; the image brings the NVIDIA container settings, and the node's
# driver is injected by the NVIDIA container toolkit / device plugin.
FROM ${CUDA_IMAGE} AS cuda-base
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM cuda-base AS cuda-build
ARG TORCH_CUDA
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c constraints.txt \
        --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" torch
COPY pyproject.toml README.md ./
COPY service ./service
COPY clients ./clients
RUN pip install --no-cache-dir -c constraints.txt '.[server]' \
    && python -c "import torch; assert torch.version.cuda, 'CPU-only torch in the CUDA image'"

# ---------------------------------------------------------------------------------------------
# The two runtime stages below set up the same user, environment, port, health check and command,
# but cannot share a stage: a stage has one parent, and theirs differ (Debian's slim Python for
# CPU; the CUDA image, with its NVIDIA settings and forward-compatibility libraries, for CUDA),
# while each must build with a plain --target. Keep them in step; tests/deploy checks both.
#
# CPU runtime.
FROM ${PYTHON_IMAGE} AS cpu
LABEL org.opencontainers.image.title="hero-rewards (CPU)" \
      org.opencontainers.image.description="HERO reward-scoring service, CPU build with the embedded reward model" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 hero \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp hero \
    && mkdir -p /models/reward-model
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf-home \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HERO_REWARD_MODEL=embedded \
    HERO_DEVICE=cpu
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# Liveness only (/healthz); readiness (/readyz) is the orchestrator's business. The model loads
# before the port opens, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["hero-rewards", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# CUDA runtime: the deployment (last stage, so also the default target).
FROM cuda-base AS cuda
LABEL org.opencontainers.image.title="hero-rewards (CUDA)" \
      org.opencontainers.image.description="HERO reward-scoring service, CUDA build; mount a Hugging Face reward model at /models/reward-model" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 hero \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp hero \
    && mkdir -p /models/reward-model
COPY --from=cuda-build /opt/venv /opt/venv
# The reward model: a Hugging Face AutoModelForSequenceClassification directory, mounted
# read-only here (docker -v ...:/models/reward-model:ro, or the PVC of deploy/overlays/gpu).
# HERO_REWARD_MODEL is an environment default rather than a flag so that it stays
# overridable (e.g. HERO_REWARD_MODEL=remote:http://vllm:8000 or =embedded).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf-home \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HERO_REWARD_MODEL=hf:/models/reward-model \
    HERO_DEVICE=cuda
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# Large models take minutes to load before the port opens.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["hero-rewards", "serve", "--host", "0.0.0.0", "--port", "8000"]
