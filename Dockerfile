# syntax=docker/dockerfile:1
#
# Serving image of LMA-CTR: `lma serve` on port 8000 over the bundles mounted at /models.
#
#   docker build -t lma-ctr:cpu --build-arg VARIANT=cpu .        # CPU (default): the serving set, no torch
#   docker build -t lma-ctr:gpu --build-arg VARIANT=gpu .        # CUDA: onnxruntime-gpu + CUDA PyTorch (TorchScript)
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/artifacts:/models:ro" lma-ctr:cpu
#   docker run --rm --gpus all -p 127.0.0.1:8000:8000 -e LMA_DEVICE=cuda -v "$PWD/artifacts:/models:ro" lma-ctr:gpu
#
# Arguments after the image name are appended to the command (e.g. `--workers 2`); settings are LMA_*
# environment variables (DESIGN section 7). podman: pass `--format docker` (the OCI format drops HEALTHCHECK)
# and `--build-arg VARIANT=...` explicitly (podman 4.3 mis-resolves the ARG-chosen stage without it);
# deploy/check-image.sh builds and runs the CPU image that way.
#
# Stages: base-cpu | base-gpu (chosen by VARIANT) -> deps: third-party packages only, installed from the lock with
# their hashes (deploy/locks/, `make lock`), so this layer is rebuilt only when a lock changes -> build: the project
# itself -> runtime: the virtual environment on the bare base, run by an unprivileged user.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu 1.31 is built against CUDA 13.0 and cuDNN 9: base image, PyTorch build and ONNX Runtime
# must agree on the CUDA major version.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS base-cpu
# Nothing to add: the onnxruntime wheel carries its native libraries.

FROM ${CUDA_IMAGE} AS base-gpu
# Ubuntu 24.04's Python is 3.12 (the project needs >= 3.11; the locks hold wheels for 3.11 and later); CUDA and
# cuDNN come with the image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---- third-party dependencies (cached until a lock changes) ------------------------------------------
FROM base AS deps
ARG VARIANT
ARG TORCH_INDEX_GPU=https://download.pytorch.org/whl/cu130
WORKDIR /src
RUN python3 -m venv "$VIRTUAL_ENV"
COPY constraints.txt ./
COPY deploy/locks/serve.txt deploy/locks/serve-cpu.txt deploy/locks/
# cpu: the serving set with plain onnxruntime (serve-cpu.txt), every file checked against its sha256; no torch.
# gpu: the serving set as `pip install lma-ctr` resolves it on Linux x86-64 (onnxruntime-gpu, serve.txt), then the
# CUDA build of PyTorch for the TorchScript runtime from the PyTorch index, at the version constraints.txt pins (that
# index is not reachable where the locks are made, so its files carry no hash in them).
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    case "$VARIANT" in \
      cpu) pip install --require-hashes -r deploy/locks/serve-cpu.txt ;; \
      gpu) pip install --require-hashes -r deploy/locks/serve.txt \
        && pip install --index-url "$TORCH_INDEX_GPU" -c constraints.txt torch ;; \
      *) echo "VARIANT must be cpu or gpu, got '$VARIANT'" >&2; exit 2 ;; \
    esac

# ---- the project ------------------------------------------------------------------------------------
FROM deps AS build
ARG VARIANT
COPY pyproject.toml README.md ./
COPY models/ models/
COPY export/ export/
COPY server/ server/
COPY loadtest/ loadtest/
# --no-deps: every dependency is in place from the lock. `pip check` then proves the lock satisfies pyproject.toml,
# except, in the CPU image, the onnxruntime-gpu that pyproject.toml names for Linux x86-64 (plain onnxruntime is
# there in its place by design). The CPU image must not contain torch.
RUN pip install --no-deps . \
 && { pip check > /tmp/pip-check.txt 2>&1 || true; } \
 && if [ "$VARIANT" = cpu ]; then sed -i '/requires onnxruntime-gpu, which is not installed/d' /tmp/pip-check.txt; fi \
 && sed -i '/^No broken requirements found/d' /tmp/pip-check.txt \
 && if [ -s /tmp/pip-check.txt ]; then cat /tmp/pip-check.txt >&2; exit 1; fi \
 && if [ "$VARIANT" = cpu ]; then python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"; fi \
 && lma --version

# ---- runtime ----------------------------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="lma-ctr" \
      org.opencontainers.image.description="CTR prediction server with LMA embeddings (${VARIANT})"
RUN groupadd --system --gid 10001 lma \
 && useradd --system --uid 10001 --gid lma --create-home --home-dir /home/lma --shell /usr/sbin/nologin lma \
 && mkdir /models
COPY --from=build /opt/venv /opt/venv
USER lma
WORKDIR /home/lma
# Numba's compiled kernels (models/jit.py) are cached under /tmp: the installed package is not writable here, and
# the Kubernetes pod's root filesystem is read-only (deploy/k8s/deployment.yaml mounts an emptyDir at /tmp).
ENV LMA_MODEL_DIR=/models \
    NUMBA_CACHE_DIR=/tmp/numba-cache
EXPOSE 8000
# Ready = models loaded and warmed up (503 before); urlopen raises on any non-2xx answer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
ENTRYPOINT ["lma", "serve", "/models", "--host", "0.0.0.0", "--port", "8000"]
