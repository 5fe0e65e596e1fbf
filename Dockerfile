# syntax=docker/dockerfile:1
# HemoTriage images; docker-compose.yml builds both, docs/deploy.md explains them.
#
#   docker build -t hemotriage-console .                       # the default (last) target
#   docker build --target engines --build-arg TENSORRT_VERSION=10.5.0 -t hemotriage-engines .
#
# console: the triage console under gunicorn. The same image runs the embedded CPU Triton
#   (`python -m build_engines serve`) and the ONNX export/quantize one-shots of the CPU profile,
#   and locust. It installs the CPU build of torch: the console imports torch only for Grad-CAM
#   and the in-process classifier, and the CUDA 13 libraries would add gigabytes for nothing.
# engines: the environment exactly as requirements.lock pins it (torch's CUDA 13 build from
#   PyPI) plus TensorRT's Python wheels, for `python -m build_engines build-trt` on the GPU
#   that will serve the plans. The project pins Python 3.11 (pyproject.toml); NGC's TensorRT
#   containers of the 24.xx releases carry Python 3.10 (Ubuntu 22.04), where the lock cannot
#   install (scipy 1.17 needs 3.11), so TensorRT comes from its PyPI wheels, pinned to the
#   version of the Triton release in docker-compose.yml.
#
# Both install like `make venv`: `pip install -r requirements.lock` (the console: the lock
# less torch's CUDA-only packages), then `pip install --no-deps --no-build-isolation -e .`.
# Not built or run where this was written (no Docker engine, no GPU); see docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ARG APP_UID=1000
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# The venv lives outside /app, so bind-mounting parts of a checkout never hides it.
RUN python -m venv /opt/venv \
    && useradd --uid "${APP_UID}" --create-home --shell /usr/sbin/nologin hemotriage
WORKDIR /app

FROM base AS engines
# TensorRT of the Triton release that loads the plans (10.5.0 = NGC 24.10, Triton 2.51);
# a plan deserializes only in the TensorRT version that built it. PyPI has the cp311
# bindings of 10.5.0 but only a stub sdist of its libraries, which fetches the wheel from
# NVIDIA's index; naming that index lets pip take the wheels directly.
ARG TENSORRT_VERSION=10.5.0
COPY requirements.lock pyproject.toml ./
RUN pip install -r requirements.lock \
    && pip install --extra-index-url https://pypi.nvidia.com "tensorrt-cu12==${TENSORRT_VERSION}"
COPY . .
RUN pip install --no-deps --no-build-isolation -e .
USER hemotriage
CMD ["python", "-m", "build_engines", "build-trt"]

FROM base AS console
# The lock minus what only torch's CUDA build needs (nvidia-* but nvidia-pytriton, cuda-*,
# triton); torch and torchvision then resolve to the CPU wheels, whose local version (+cpu)
# satisfies the pins (PEP 440 ignores local labels in ==), and pip prefers it as the higher.
COPY requirements.lock pyproject.toml ./
RUN grep -Pv '^(nvidia-(?!pytriton)|cuda-|triton==)' requirements.lock > /tmp/requirements.cpu.lock \
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        -r /tmp/requirements.cpu.lock \
    && rm /tmp/requirements.cpu.lock
COPY . .
# The embedded Triton copies its python-backend stub into site-packages on first start
# (build_engines/serve.py); do it now, as root, because the app user cannot write there.
RUN pip install --no-deps --no-build-isolation -e . \
    && python -c "from build_engines.serve import ensure_python_stub, find_triton; \
ensure_python_stub(find_triton())" \
    && install -d -o hemotriage -g hemotriage /var/lib/hemotriage
# Uploads, SQLite database, inbox and session key (a volume in docker-compose.yml).
ENV HEMOTRIAGE_STORAGE_DIR=/var/lib/hemotriage \
    HEMOTRIAGE_CONSOLE_BIND=0.0.0.0:5000
USER hemotriage
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=3)"]
CMD ["gunicorn", "-c", "console/gunicorn.conf.py"]
