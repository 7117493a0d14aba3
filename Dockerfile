# syntax=docker/dockerfile:1

# GPU image for llmatch (API, encoder worker, migrations).
#
# CUDA line: 12.6 everywhere. torch 2.13 ships CUDA 12.6 and 13.x wheels (12.8 was dropped in 2.12), and
# faiss-gpu 1.15.1 is built against CUDA 12.6 and depends on the nvidia-*-cu12 runtime wheels, so torch comes
# from the cu126 wheel index and both share one set of CUDA 12 libraries. Host driver: one that supports
# CUDA 12.6 (R560 or newer, or a datacenter driver with forward compatibility). The cu126 builds cover
# Maxwell to Hopper GPUs (not Blackwell).
#
# Python: exactly 3.11 (pyproject requires >=3.11,<3.12), a uv-managed CPython copied into the final stage
# together with the virtual environment at /opt/venv.

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${CUDA_IMAGE} AS builder

COPY --from=uv /uv /usr/local/bin/uv

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN uv python install --no-bin 3.11 \
 && uv venv --python 3.11 /opt/venv \
 && python -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'

# CUDA build of torch first, from the PyTorch wheel index; its version must equal the torch pin in
# pyproject.toml (the dependency step below keeps it because 2.13.0+cu126 satisfies torch==2.13.0).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu126
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project's pinned dependencies, read from pyproject.toml, with faiss-cpu excluded from resolution and
# faiss-gpu (same version, same files) in its place: the two packages cannot be installed together.
ARG FAISS_GPU_VERSION=1.15.1
WORKDIR /src
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/uv \
    echo "faiss-cpu" > /tmp/excludes.txt \
 && uv pip install -r pyproject.toml --excludes /tmp/excludes.txt "faiss-gpu==${FAISS_GPU_VERSION}"

# The project itself, without dependencies (non-editable: the source tree stays in this stage).
COPY . .
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --no-deps . \
 && python -c 'import importlib.metadata as md, sys; \
names = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}; \
assert "faiss-cpu" not in names, "faiss-cpu must not be installed next to faiss-gpu"; \
assert md.version("faiss-gpu") == sys.argv[1], "faiss-gpu " + md.version("faiss-gpu"); \
assert md.version("torch") == sys.argv[2], "torch " + md.version("torch"); \
assert "llmatch" in names' \
    "${FAISS_GPU_VERSION}" "${TORCH_VERSION}+${TORCH_CUDA}" \
 && python -c 'import faiss, torch; assert hasattr(faiss, "StandardGpuResources"), "faiss has no GPU support"' \
 && llmatch --help > /dev/null


FROM ${CUDA_IMAGE}

ARG APP_UID=10001
RUN groupadd --gid "${APP_UID}" llmatch \
 && useradd --uid "${APP_UID}" --gid llmatch --create-home --home-dir /home/llmatch \
        --shell /usr/sbin/nologin llmatch \
 && mkdir -p /data /app \
 && chown llmatch:llmatch /data /app

COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    LLMATCH_DATA_DIR=/data

WORKDIR /app
USER ${APP_UID}:${APP_UID}

EXPOSE 8000

# Auth is on: `serve` bound to 0.0.0.0 refuses to start until an API key exists. Give it one at start-up with
# LLMATCH_ADMIN_KEY_FILE (a mounted secret, as docker-compose.yml does) or LLMATCH_ADMIN_KEY, or create keys
# with `llmatch keys create` against the same database. Never add --insecure-no-auth to this command.

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["llmatch"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
