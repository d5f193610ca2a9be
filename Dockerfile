# The moefleet image: the Ray head runs `moefleet serve` (controller and gateways), the worker
# nodes host the replicas and the expert shards (helm/moefleet deploys it through KubeRay).
#
# CPU by default:
#   docker build -t moefleet/moefleet:0.1.0 .
# For NVIDIA GPUs, a CUDA base and torch's CUDA wheels (see helm/README.md, "The image"):
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                -t moefleet/moefleet:0.1.0-cuda .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# g++ builds the CPU kernels (kernels/csrc) at first start; wget serves KubeRay's default probes of
# the worker pods. A CUDA base brings no Python: then Debian's/Ubuntu's.
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ wget ca-certificates \
 && if ! command -v python3 >/dev/null; then \
      apt-get install -y --no-install-recommends python3 python3-venv python3-dev; fi \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# torch first, from the index that matches the base (an open range on PyPI pulls a CUDA build).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/moefleet
COPY pyproject.toml README.md ./
COPY moefleet ./moefleet
COPY kernels ./kernels
COPY models ./models
COPY actors ./actors
COPY cluster ./cluster
COPY autoscaler ./autoscaler
RUN pip install --no-cache-dir .

# Not root (the chart's securityContext also says so); the root filesystem may be read-only: HOME
# (caches, the kernels' build) and Ray's session directory live under /tmp, an emptyDir in the pod.
RUN useradd --uid 1000 --no-create-home moefleet
USER 1000
ENV HOME=/tmp
EXPOSE 50051 8000 6379 8265 10001
CMD ["moefleet", "serve", "--config", "/etc/moefleet/cluster.yaml"]
