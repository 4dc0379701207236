# Fresh clone:  make demo   (set up, then run the main job)
#               make test   (set up, then run the tests)
# The set-up makes .venv with torch, ninja and pytest, then builds the extension in place
# (pip install --no-build-isolation -e .). Another torch: make TORCH_SPEC='torch==2.6.0' test
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
SOURCES := setup.py pyproject.toml torch_secorder/_build_config.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)

.PHONY: setup demo test test-fast lint format bench clean

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" ninja pytest "setuptools>=64" wheel numpy
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m torch_secorder --method all

test: setup
	$(BIN)/python -m pytest -q

# for contributors: the suite without the tests marked slow (builds, installs, dense ResNet references)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# ruff (lint and format check) and mypy, as .ci/run runs them
lint: setup
	$(BIN)/python -m pip install -q "ruff==0.17.6" "mypy==2.4.1"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/python -m pip install -q "ruff==0.17.6"
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/bench_generic.py

clean:
	rm -rf $(VENV) build *.egg-info torch_secorder/*.so
