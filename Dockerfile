# sparsezoo worker image: the platform with the team-stack extras (PostgreSQL driver, S3 client,
# optuna-dashboard). CPU by default; for GPUs build with a CUDA base and the matching wheel index:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# (a CUDA base needs python3/pip: the apt step below installs them when missing)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SPARSEZOO_CACHE=/cache/sparsezoo

RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CPU (or CUDA) index, so that the project's torch>=2.6 is already met
RUN pip install --upgrade pip && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sparsezoo ./sparsezoo
COPY mechanisms ./mechanisms
COPY kernels ./kernels
COPY configs ./configs
COPY experiments ./experiments
RUN pip install ".[team]"

RUN useradd --create-home --uid 1000 sparsezoo && mkdir -p /cache /app/runs \
    && chown -R sparsezoo /cache /app/runs
USER sparsezoo
ENTRYPOINT ["sparsezoo"]
CMD ["--help"]
