# demhx on NVIDIA GPUs (README.md, "Containers (HPC)"):
#     docker build -t demhx .
#     docker run --gpus all --user "$(id -u):$(id -g)" -v "$PWD":/data demhx in.mrc out.mrc
#
# Versions. onnxruntime-gpu 1.31.1 (the newest release on PyPI) is built against CUDA 13.0
# and cuDNN 9: its CUDA provider links libcudart.so.13, libcublas.so.13 and libcublasLt.so.13,
# and its wheel metadata names nvidia-cudnn-cu13 ~= 9.0 (ONNX Runtime's CUDA Execution Provider
# requirements: CUDA 13.x needs cuDNN 9.x; any 13.x minor version works). The base image below
# carries the CUDA 13.0 runtime libraries and cuDNN 9 on Ubuntu 24.04, whose Python 3.12
# satisfies the wheel's Requires-Python >= 3.11. The host needs an NVIDIA driver for CUDA 13
# (580 or newer) and the NVIDIA Container Toolkit. Change ORT_GPU_VERSION and CUDA_IMAGE
# together: an onnxruntime-gpu built for another CUDA major version does not start on this base.
#
# Install. The runtime's dependencies are those of pyproject.toml with the CUDA build
# onnxruntime-gpu in place of the CPU package onnxruntime: both install the same `onnxruntime`
# module, and demhx refuses to start with both present. So the dependencies are installed
# explicitly and demhx itself with --no-deps. The shipped models (models/, package data
# demhx.models) are installed with the package; LICENSE is copied because pyproject.toml
# names it in license-files (the wheel carries it; setuptools warns without it).

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- build: a virtual environment in /opt/demhx ----
FROM ${CUDA_IMAGE} AS build
ARG ORT_GPU_VERSION=1.31.1
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 ORT_DISABLE_TELEMETRY=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/demhx
# Binary wheels only: nothing is compiled, so no compiler is needed at any stage.
RUN /opt/demhx/bin/pip install --no-cache-dir --only-binary=:all: \
        "numpy>=1.24" "scipy>=1.10" "mrcfile>=1.5" "numba>=0.58" "fire>=0.7,<0.8" \
        "onnxruntime-gpu==${ORT_GPU_VERSION}"
COPY pyproject.toml README.md LICENSE /src/
COPY demhx /src/demhx
COPY models /src/models
RUN /opt/demhx/bin/pip install --no-cache-dir --no-deps /src
# Check the result: no CPU onnxruntime beside onnxruntime-gpu, CUDA support, models installed.
RUN /opt/demhx/bin/python -c "import importlib.metadata as m, importlib.resources as r; \
import onnxruntime as ort, demhx.models; \
assert 'onnxruntime' not in {d.metadata['Name'] for d in m.distributions()}, 'CPU onnxruntime'; \
assert 'CUDAExecutionProvider' in ort.get_available_providers(), 'no CUDA provider'; \
assert r.files(demhx.models).joinpath('registry.json').is_file(), 'models missing'"

# ---- runtime: the CUDA base, Python 3 and the virtual environment ----
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/demhx /opt/demhx
# numba caches compiled kernels on disk; the installation is read-only to the user, and a
# user given with `docker run -u UID` has no home: numba stops with "cannot cache function"
# unless the cache has a writable place. Compiling them takes about 11 s (2 cores), in every
# fresh container: so they are compiled here, for any x86-64 CPU (NUMBA_CPU_NAME=generic), into
# /opt/demhx/numba-seed, which demhx copies into the writable cache on its first run.
# ONNX Runtime (1.29 and later) sends usage telemetry and keeps a device id in the home folder
# unless ORT_DISABLE_TELEMETRY=1.
ENV PATH=/opt/demhx/bin:$PATH \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    NUMBA_CPU_NAME=generic \
    DEMHX_NUMBA_SEED=/opt/demhx/numba-seed \
    ORT_DISABLE_TELEMETRY=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN NUMBA_CACHE_DIR=/opt/demhx/numba-seed python3 -m demhx._precompile \
    && chmod -R a+rX /opt/demhx/numba-seed \
    && useradd --create-home --user-group demhx \
    && demhx --version
USER demhx
WORKDIR /data
ENTRYPOINT ["demhx"]
CMD ["--help"]
