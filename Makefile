# The two quick-start commands are `make demo` and `make test`; each (re)creates
# the virtualenv from the pinned lock file when it is missing or out of date.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MANIFEST ?=
DEMO_DIR ?= runs/demo_job
PYTEST_ARGS ?=

.PHONY: venv demo test test-slow test-all lint format results bench clean

$(STAMP): requirements/lock.txt requirements/build-constraints.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=25.3"
	# bert-for-tf2 & co. are sdists that need setuptools<70 to build.
	$(PY) -m pip install -q --build-constraint requirements/build-constraints.txt -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmtf demo --out $(DEMO_DIR) $(if $(MANIFEST),--manifest $(MANIFEST))

# The default run (< 15 min on 2 cores) leaves out the multi-process cluster
# tests marked `slow`; CI runs both.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check multimodal_tf tests benchmarks pipelines notebooks tools
	$(VENV)/bin/ruff format --check multimodal_tf tests benchmarks pipelines notebooks tools

format: $(STAMP)
	$(VENV)/bin/ruff check --fix multimodal_tf tests benchmarks
	$(VENV)/bin/ruff format multimodal_tf tests benchmarks

results: $(STAMP)
	$(PY) pipelines/results.py

bench: $(STAMP)
	$(PY) benchmarks/input_pipeline.py

clean:
	rm -rf $(VENV) .mmtf_cache runs models
