# Two commands do everything: `make run` (the quick distillation) and `make test`.
# As a service: `make stack` (Prefect server + MLflow server + worker, deployments applied), `make stack-stop`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(abspath ../shared/data)
export DISTILL_DATA_DIR ?= $(DATA_DIR)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv install run test lint clean stack stack-stop stack-status deploy screenshots bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; a looser spec pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m flows.cli run $(ARGS)

# Ratios measured side by side in one process (teacher cache vs bare encode; students vs their FLOP limit).
bench: install
	$(PY) scripts/bench.py $(ARGS)

stack: install
	$(PY) -m deployments.stack start $(STACK_ARGS)

stack-stop:
	$(PY) -m deployments.stack stop $(STACK_ARGS)

stack-status:
	$(PY) -m deployments.stack status $(STACK_ARGS)

# Apply the deployments to the server PREFECT_API_URL names (make stack does this for its own server).
deploy: install
	$(PY) -m deployments.deploy

test: install
	$(VENV)/bin/ruff check flows tasks tests scripts deployments
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check flows tasks tests scripts deployments
	$(VENV)/bin/ruff format --check flows tasks tests scripts deployments

clean:
	-test -x $(PY) && $(PY) -m deployments.stack stop
	rm -rf .distill
