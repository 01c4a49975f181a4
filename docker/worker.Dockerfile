# syntax=docker/dockerfile:1
# An HSCR GPU worker: CUDA + vLLM + the worker. Run one container per GPU (CUDA_VISIBLE_DEVICES).
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t hscr-worker .
# vLLM 0.32's PyPI wheel is built against CUDA 13 (torch 2.13 cu13 wheels bring their own CUDA
# libraries); the base image provides the NVIDIA container runtime's environment. The host driver
# must support CUDA 13.
ARG CUDA_VERSION=13.0.2
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# vLLM first (the big, slow layer), so code changes below rebuild in seconds.
RUN pip install "vllm==0.32.*"

COPY client/ /src/client/
COPY jobs/ /src/jobs/
COPY worker/ /src/worker/
COPY docker/worker_healthcheck.py /usr/local/bin/hscr-worker-healthcheck
RUN pip install /src/client /src/jobs /src/worker \
    && rm -rf /src \
    && chmod 0755 /usr/local/bin/hscr-worker-healthcheck \
    && useradd --create-home --uid 10001 hscr

USER hscr
WORKDIR /home/hscr
# Models: mount a directory at /models and set HSCR_WORKER_MODEL=/models/<name>; the default is the
# bundled fixture Med-VLM. Hub downloads go to the HF cache volume.
ENV HF_HOME=/home/hscr/.cache/huggingface \
    HSCR_WORKER_BACKEND=vllm

# Healthy while this container's RQ worker heartbeats in Redis (the model can take minutes to load).
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "/usr/local/bin/hscr-worker-healthcheck"]

# One process per GPU; RQ's scheduler runs in every worker (one holds the lock, the rest stand by).
CMD ["hscr", "worker", "--with-scheduler"]
