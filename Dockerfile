# syntax=docker/dockerfile:1
#
# hero-rewards container images. Two targets from one Python base:
#
#   cpu   anywhere: CPU-only torch and the embedded all-MiniLM-L6-v2 stand-in RM that ships
#         inside a pip package (no model download)
#   cuda  the deployment (default target): CUDA torch; a Hugging Face reward model mounted
#         read-only at /models/reward-model
#
# Build (BuildKit or buildah; `make image` picks docker, else buildah, see deploy/README.md):
#
#   docker build --target cpu -t hero-rewards:0.1.0-cpu .
#   docker build --target cuda -t hero-rewards:0.1.0-cuda .
#   podman build --format docker --target cpu -t hero-rewards:0.1.0-cpu .   # or buildah bud
#
#   # torch from a mirror, behind a TLS-intercepting proxy (see below):
#   docker build --target cpu --build-arg TORCH_INDEX_URL=https://mirror.example/whl/cpu \
#       --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt -t hero-rewards:0.1.0-cpu .
#
# --format docker keeps the HEALTHCHECK (the OCI image format has no field for it). Build
# arguments:
#
#   PYTHON_IMAGE          the base of every stage (a Debian Python 3.11 with `python` on PATH);
#                         `make image` builds a local one where no registry is reachable
#   TORCH_INDEX_URL       where the cpu target's torch comes from (a pip index or a mirror of
#                         https://download.pytorch.org/whl/cpu)
#   TORCH_CUDA_INDEX_URL  the same for the cuda target (a CUDA build the pinned torch publishes)
#
# Behind a TLS-intercepting proxy, give pip the full CA bundle (system roots plus the proxy's
# CA) as a build secret: `--secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt`. Only the
# pip steps see it (mounted at /run/secrets/ca-bundle); no layer of the image keeps it.
#
# Run:
#
#   docker run --gpus all -p 8000:8000 -e HERO_API_KEY=... \
#       -v /path/to/Skywork-Reward-Llama-3.1-8B:/models/reward-model:ro hero-rewards:0.1.0-cuda
#   docker run -p 8000:8000 -e HERO_API_KEY=... hero-rewards:0.1.0-cpu
#
# Both run as uid 10001, listen on 0.0.0.0:8000 and so need an API key (HERO_API_KEY or
# HERO_API_KEY_FILE) or an explicit --insecure. Nothing is downloaded at start
# (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1); the root filesystem can be read-only as long as
# /tmp is writable. Every HERO_* variable (see `hero-rewards serve --help`) configures the
# service; flags on the command line win over them. `make image-check` builds the cpu target
# and proves these claims by running it (deploy/image/check.py).
#
# torch is pinned by constraints.txt (the same file the Makefile uses). The image leaves out
# sentence-transformers (and its scikit-learn and scipy), which the embedded-model package
# declares but the service never imports: see deploy/image/install.py. The base image is
# pinned by tag; pin it by digest in your registry mirror.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128

# ---------------------------------------------------------------------------------------------
# Build steps both targets share: a virtual environment in /opt/venv with the service and every
# dependency but torch, which comes last, per target. deploy/image/install.py holds the pip
# commands of every step (pinned by constraints.txt; what the image leaves out, and why).
FROM ${PYTHON_IMAGE} AS build
# Marks this Dockerfile's images, cached steps included: `make image` prunes its own stale
# layer cache by it (deploy/image/build.py).
LABEL io.hero-rewards.stage="build"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY constraints.txt pyproject.toml ./
COPY deploy/image/install.py ./deploy/image/
RUN --mount=type=secret,id=ca-bundle python deploy/image/install.py deps
COPY README.md ./
COPY service ./service
COPY clients ./clients
RUN --mount=type=secret,id=ca-bundle python deploy/image/install.py project

# torch for one target, then a check of the whole environment. Its wheel is kept in a build
# cache (never in the image): a change to the sources, which come before it, reinstalls torch
# without downloading it again.
FROM build AS cpu-build
ARG TORCH_INDEX_URL
RUN --mount=type=secret,id=ca-bundle --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    python deploy/image/install.py torch cpu "${TORCH_INDEX_URL}"

FROM build AS cuda-build
ARG TORCH_CUDA_INDEX_URL
RUN --mount=type=secret,id=ca-bundle --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    python deploy/image/install.py torch cuda "${TORCH_CUDA_INDEX_URL}"

# ---------------------------------------------------------------------------------------------
# The runtime both targets share: user, environment, port, health check and command. The CUDA
# target needs no CUDA base image: the torch wheel brings its CUDA runtime libraries, and the
# node's driver is injected by the NVIDIA container toolkit / device plugin.
FROM ${PYTHON_IMAGE} AS runtime
LABEL io.hero-rewards.stage="runtime" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 hero \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp hero \
    && mkdir -p /models/reward-model
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf-home \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# Liveness only (/healthz); readiness (/readyz) is the orchestrator's business. The model loads
# before the port opens: large reward models take minutes, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["hero-rewards", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# CPU runtime: the embedded reward model.
FROM runtime AS cpu
LABEL org.opencontainers.image.title="hero-rewards (CPU)" \
      org.opencontainers.image.description="HERO reward-scoring service, CPU build with the embedded reward model"
COPY --from=cpu-build /opt/venv /opt/venv
ENV HERO_REWARD_MODEL=embedded \
    HERO_DEVICE=cpu

# ---------------------------------------------------------------------------------------------
# CUDA runtime: the deployment (last stage, so also the default target). The reward model is a
# Hugging Face AutoModelForSequenceClassification directory mounted read-only at
# /models/reward-model (docker -v ...:/models/reward-model:ro, or the PVC of deploy/overlays/gpu).
# HERO_REWARD_MODEL is an environment default rather than a flag so that it stays overridable
# (e.g. HERO_REWARD_MODEL=remote:http://vllm:8000 or =embedded).
FROM runtime AS cuda
LABEL org.opencontainers.image.title="hero-rewards (CUDA)" \
      org.opencontainers.image.description="HERO reward-scoring service, CUDA build; mount a Hugging Face reward model at /models/reward-model"
COPY --from=cuda-build /opt/venv /opt/venv
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HERO_REWARD_MODEL=hf:/models/reward-model \
    HERO_DEVICE=cuda
