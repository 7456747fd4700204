# syntax=docker/dockerfile:1
#
# Container image of device-api-server (and the NVML provider sidecar, same image).
#
#   docker build -t ghcr.io/deviceapi/device-api-server:0.1.0 .
#
# Two stages: a Debian builder makes a virtual environment in /opt/venv; the runtime is distroless
# Python (same Debian release, so the same /usr/bin/python3.11 the venv points at): no shell, no
# package manager, nothing to exec into. The process runs as nobody (65534), with a read-only root
# file system: bytecode is compiled at build time and Python writes nothing at run time.
# Console scripts on PATH: device-api-server (the entrypoint), device-api (CLI),
# device-api-nvml-provider (the sidecar's command), and python (the chart's init container).

ARG BUILDER_IMAGE=debian:12-slim
ARG RUNTIME_IMAGE=gcr.io/distroless/python3-debian12:nonroot

FROM ${BUILDER_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first (cached while only the source changes), then the package itself.
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip uninstall -y pip \
 && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib \
 && /opt/venv/bin/device-api-server --help >/dev/null

FROM ${RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.title="device-api-server" \
      org.opencontainers.image.description="Node-local GPU device-state gRPC server" \
      org.opencontainers.image.source="https://github.com/deviceapi/deviceapi" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build --chown=0:0 /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# nobody:nogroup; the chart sets the same ids in its security context.
USER 65534:65534
# gRPC stays on the unix socket (and loopback TCP 50051); health 8081, metrics 9090.
EXPOSE 8081 9090
ENTRYPOINT ["/opt/venv/bin/device-api-server"]
CMD ["--log-format=json"]
