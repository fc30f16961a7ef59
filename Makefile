# specvlm: every target creates .venv if missing and installs torch==2.13.0 before the project.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo demo-model test bench lint install dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

DEMO_OUT ?= out/caption-demo

# rebuilds the demo model from its recipe into $$SPECVLM_HOME/demo (the package ships the same build);
# FAMILY=qwen2_5_vl builds the Qwen2.5-VL-shaped demo into $$SPECVLM_HOME/demo-qwen2_5_vl
FAMILY ?= llava
demo-model: $(VENV)/.installed
	$(BIN)/specvlm demo-model --family $(FAMILY) $(DEMO_MODEL_ARGS)

demo: $(VENV)/.installed
	$(BIN)/specvlm caption --input examples/inputs --output $(DEMO_OUT)

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.bench
	$(BIN)/specvlm bench

lint: $(VENV)/.dev
	$(BIN)/ruff check specvlm actors pipelines benchmarks k8s tests
	$(BIN)/ruff format --check specvlm actors pipelines benchmarks k8s tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
