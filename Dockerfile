# syntax=docker/dockerfile:1
# The streamtrain daemon, and `streamtrain serve` (the serve extra is installed: FastAPI, uvicorn).
# The CPU image by default:
#   docker build -t streamtrain .
# The CUDA image: the same base, torch from PyTorch's CUDA index (its wheels bring the CUDA
# runtime; the host needs the NVIDIA driver and the container toolkit, run with --gpus all):
#   docker build -t streamtrain:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
# BASE may name another image with Python 3.10+ and pip (e.g. for a newer Python).
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Pin it for reproducible images, e.g. --build-arg TORCH_SPEC=torch==2.5.1 (pyproject asks torch>=2.3).
ARG TORCH_SPEC=torch

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the chosen index, so `pip install .` finds it satisfied and does not
# pull the (CUDA) build from PyPI; then the project and its other dependencies.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

COPY pyproject.toml README.md /tmp/src/
COPY streamtrain /tmp/src/streamtrain
COPY daemon /tmp/src/daemon
COPY streams /tmp/src/streams
COPY models /tmp/src/models
COPY config /tmp/src/config
COPY tools /tmp/src/tools
COPY serve /tmp/src/serve
# hadolint ignore=DL3013
RUN pip install "/tmp/src[serve]" && rm -rf /tmp/src

# The demo producer of docker-compose.yml: `python -m demo.producer` finds it in the working
# directory.  It is not in the installed package, which is the daemon alone.
WORKDIR /opt/streamtrain
COPY demo/__init__.py demo/synthetic.py demo/producer.py ./demo/

# A dedicated unprivileged user; snapshots live on the volume it owns.
RUN useradd --system --user-group --uid 10001 --home-dir /var/lib/streamtrain --shell /usr/sbin/nologin streamtrain \
    && mkdir -p /var/lib/streamtrain /etc/streamtrain \
    && chown streamtrain:streamtrain /var/lib/streamtrain
VOLUME /var/lib/streamtrain
# streamtrain, by number (so Kubernetes' runAsNonRoot can check it)
USER 10001:10001

# metrics.port: /metrics, /healthz, /readyz (the config must set metrics.host: 0.0.0.0).
# `streamtrain serve --port 8501` listens there instead; docker-compose.yml publishes it.
EXPOSE 9100
# /healthz: the training loop turns and the ingest thread lives (no curl in the slim image).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9100/healthz', timeout=4)"]

# SIGTERM (docker stop) writes the final snapshot: give it time (docker stop -t, stop_grace_period).
ENTRYPOINT ["streamtrain"]
CMD ["run", "--config", "/etc/streamtrain/config.yaml"]
