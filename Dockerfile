# syntax=docker/dockerfile:1
#
# Serving image of LMA-CTR: `lma serve` on port 8000 over the bundles mounted at /models.
#
#   docker build -t lma-ctr:cpu .                                # CPU (default): PyTorch CPU build
#   docker build -t lma-ctr:gpu --build-arg VARIANT=gpu .        # CUDA: PyTorch CUDA build + onnxruntime-gpu
#   docker run --rm -p 8000:8000 -v "$PWD/artifacts:/models:ro" lma-ctr:cpu
#   docker run --rm --gpus all -p 8000:8000 -e LMA_DEVICE=cuda -v "$PWD/artifacts:/models:ro" lma-ctr:gpu
#
# Arguments after the image name are appended to the command (e.g. `--workers 2`); settings are LMA_*
# environment variables (DESIGN section 7).
#
# Stages: base-cpu | base-gpu (chosen by VARIANT) -> deps: third-party packages only, so this layer is rebuilt
# only when pyproject.toml or constraints.txt change -> build: the project itself -> runtime: the virtual
# environment on the bare base, run by an unprivileged user.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu 1.31 is built against CUDA 13.0 and cuDNN 9: base image, PyTorch build and ONNX Runtime
# must agree on the CUDA major version.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS base-cpu
# Nothing to add: the torch and onnxruntime wheels carry their native libraries.

FROM ${CUDA_IMAGE} AS base-gpu
# Ubuntu 24.04's Python is 3.12 (the project needs >= 3.11); CUDA and cuDNN come with the image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---- third-party dependencies (cached until pyproject.toml or constraints.txt change) -----------------
FROM base AS deps
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_GPU=https://download.pytorch.org/whl/cu130
WORKDIR /src
RUN python3 -m venv "$VIRTUAL_ENV"
COPY pyproject.toml constraints.txt ./
# torch first, from the PyTorch index of the variant (PyPI's default torch is a multi-GB CUDA build); then the
# project's dependencies read from pyproject.toml, pinned by constraints.txt (which pins torch to the same
# version, so the build just installed satisfies them).
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    case "$VARIANT" in \
      cpu) index="$TORCH_INDEX_CPU" ;; \
      gpu) index="$TORCH_INDEX_GPU" ;; \
      *) echo "VARIANT must be cpu or gpu, got '$VARIANT'" >&2; exit 2 ;; \
    esac; \
    pip install --index-url "$index" "torch==${TORCH_VERSION}"; \
    python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      > /tmp/requirements.txt; \
    pip install -c constraints.txt -r /tmp/requirements.txt

# ---- the project ------------------------------------------------------------------------------------
FROM deps AS build
COPY README.md ./
COPY models/ models/
COPY export/ export/
COPY server/ server/
COPY loadtest/ loadtest/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
 && pip check

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
ENV LMA_MODEL_DIR=/models
EXPOSE 8000
# Ready = models loaded and warmed up (503 before); urlopen raises on any non-2xx answer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
ENTRYPOINT ["lma", "serve", "/models", "--host", "0.0.0.0", "--port", "8000"]
