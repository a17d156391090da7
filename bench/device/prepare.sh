#!/usr/bin/env bash
# Run HERE (not on the GPU machine), from the repository root: builds the git-ignored .device/
# that the GPU runs carry (run(..., carry=[".device"])). The GPU machine has Python 3.12,
# torch 2.11 (CUDA 13), triton, transformers, grpcio 1.84.0 and no package registry, so:
#   .device/pkgs.tgz  NIXL + Mooncake for CUDA 13 (../shared/tools/device-pkgs.sh)
#   .device/whl/      cp312 binary wheels the machine lacks or has too old (unzipped there by
#                     env.sh): grpcio 1.85.1 (the generated stubs refuse 1.84), httptools,
#                     pydantic-core
#   .device/py/       pure-Python packages it lacks (gateway, bench, tracing, GGUF)
# The whole working tree a run carries must stay under 64 MiB (this is ~58 MB).
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
[ -f .device/pkgs.tgz ] || bash ../shared/tools/device-pkgs.sh
mkdir -p .device/whl .device/py
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .device/whl \
    grpcio==1.85.1 httptools==0.9.0 pydantic_core==2.50.5
pure=$(mktemp -d)
trap 'rm -rf "$pure"' EXIT
python3 -m pip download -q --no-deps -d "$pure" \
    grpcio-health-checking==1.85.1 gguf==0.19.0 tqdm==4.70.1 uvicorn==0.54.0 \
    starlette==1.10.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 importlib_metadata==10.2.0 opentelemetry-api==1.45.2 \
    opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
    opentelemetry-exporter-otlp-proto-common==1.45.2 \
    opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-semantic-conventions==0.66b2
for w in "$pure"/*.whl; do python3 -m zipfile -e "$w" .device/py; done
du -sh .device
