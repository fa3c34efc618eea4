#!/usr/bin/env bash
# The GPU benchmark's two steps (bench/README.md, "GPU"):
#
#   bench/gpu.sh prepare        HERE, before the device call: copies the dev data and downloads
#                               the wheels the device image lacks (pydantic and its three
#                               helpers, at the versions of this .venv, for its Python 3.12)
#                               into bench/results/device/ (git-ignored), the folder the call
#                               carries; records the commit measured.
#   bench/gpu.sh run [ARGS]     ON THE DEVICE MACHINE: installs those wheels into /tmp, puts
#                               the source tree on the path and runs bench/gpu.py ARGS with the
#                               image's python3 (its torch with CUDA, transformers, tokenizers,
#                               prometheus_client, jinja2, httpx are there already); results
#                               and the whole log go to $OUT.
#
# PYTHON overrides the interpreter of either step, HERO_DEV_DATA the data prepare copies,
# HERO_GPU_CARRY the folder (tests point it elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${HERO_GPU_CARRY:-bench/results/device}
# What hero_client.schema needs beyond the image (its pydantic models reach the batcher through
# hero_service.metrics).
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)

case "${1:-}" in
prepare)
    PY=${PYTHON:-.venv/bin/python}
    rm -rf "$CARRY"
    mkdir -p "$CARRY/wheels"
    cp "${HERO_DEV_DATA:-../shared/data/math-rollouts-dev.jsonl}" "$CARRY/math-rollouts-dev.jsonl"
    git rev-parse --short HEAD >"$CARRY/commit"
    pins=()
    for name in "${WHEELS[@]}"; do
        pins+=("$name==$("$PY" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$name")")
    done
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$CARRY/wheels" "${pins[@]}"
    ls "$CARRY/wheels"
    du -sh "$CARRY"
    ;;
run)
    shift
    PY=${PYTHON:-python3}
    RESULTS=${OUT:-bench/results}
    mkdir -p "$RESULTS"
    # The carried wheels only where this interpreter has no working pydantic 2 of its own (the
    # device image has none; they are built for Python 3.12).
    if ! "$PY" -c 'import pydantic; assert pydantic.VERSION.startswith("2.")' 2>/dev/null &&
        compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/hero-gpu-site "$CARRY"/wheels/*.whl
        export PYTHONPATH=/tmp/hero-gpu-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=service:clients/python${PYTHONPATH:+:$PYTHONPATH}
    if ! "$PY" -c 'import hero_service.batching' 2>"$RESULTS/import-error.txt"; then
        echo "gpu.sh: the service does not import here (see below); run 'bench/gpu.sh prepare'" \
            "on the development machine and carry $CARRY" >&2
        cat "$RESULTS/import-error.txt" >&2
        exit 2
    fi
    rm -f "$RESULTS/import-error.txt"
    data=()
    [ -f "$CARRY/math-rollouts-dev.jsonl" ] && data=(--data "$CARRY/math-rollouts-dev.jsonl")
    commit=()
    [ -f "$CARRY/commit" ] && commit=(--commit "$(cat "$CARRY/commit")")
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw \
        --format=csv 2>/dev/null || true
    set -o pipefail
    PYTHONUNBUFFERED=1 "$PY" bench/gpu.py --results-dir "$RESULTS" "${data[@]}" "${commit[@]}" \
        "$@" 2>&1 | tee "$RESULTS/gpu.log"
    ;;
*)
    echo "usage: bench/gpu.sh prepare | run [bench/gpu.py options]" >&2
    exit 2
    ;;
esac
