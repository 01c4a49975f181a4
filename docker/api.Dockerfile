# syntax=docker/dockerfile:1
# The HSCR API: FastAPI + the SDK's wire models. No torch, no model: workers do the GPU work.
# Build from the repository root:  docker build -f docker/api.Dockerfile -t hscr-api .
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only the components the API needs (the SDK contract and the job lifecycle); worker/ and trainer/ (torch)
# never enter this image.
COPY client/ /src/client/
COPY jobs/ /src/jobs/
COPY service/ /src/service/
RUN pip install /src/client /src/jobs /src/service \
    && rm -rf /src \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && useradd --create-home --uid 10001 hscr

USER hscr
WORKDIR /home/hscr
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Settings come from HSCR_* variables (see docker/.env.example). --proxy-headers: behind a TLS proxy.
CMD ["uvicorn", "hscr_service.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", \
     "--timeout-graceful-shutdown", "20"]
