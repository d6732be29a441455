# The two quick-start commands are `make demo` and `make test`; each (re)creates
# the virtualenv from the pinned lock file when it is missing or out of date.
#
# Two lock files (docs/dependencies.md):
#   requirements/lock.txt         the default stack, TensorFlow 2.21 (.venv)
#   requirements/lock-tf2.17.txt  the compatibility stack, TensorFlow 2.17.1 with
#                                 tensorflow-io 0.37.1 (.venv-tf2.17, make test-compat)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
COMPAT_VENV ?= .venv-tf2.17
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed-stamp
MANIFEST ?=
DEMO_DIR ?= runs/demo_job
PYTEST_ARGS ?=
# What the compatibility stack must keep passing: the data layer (incl. the
# tensorflow-io reader backend), models, export and serving, and the shims.
COMPAT_TESTS ?= tests/test_audio_io.py tests/test_data_layer.py tests/test_preprocessing.py \
	tests/test_input_limits.py tests/test_models.py tests/test_encoders.py tests/test_fusion.py \
	tests/test_export.py tests/test_serving_target.py tests/test_tf1_session.py tests/test_compat.py \
	tests/test_serving_grpc.py tests/test_serving_rest.py tests/test_serving_concurrency.py \
	tests/test_bert.py tests/test_audio_saved_model.py

.PHONY: venv venv-compat demo test test-slow test-all test-compat lint format results bench clean

# $(1): the virtualenv, $(2): its lock file.
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade "pip>=25.3"
	# bert-for-tf2 & co. are sdists that need setuptools<70 to build.
	$(1)/bin/python -m pip install -q --build-constraint requirements/build-constraints.txt -r $(2)
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(1)/.installed-stamp
endef

$(STAMP): requirements/lock.txt requirements/build-constraints.txt setup.cfg pyproject.toml
	$(call make_venv,$(VENV),requirements/lock.txt)

$(COMPAT_STAMP): requirements/lock-tf2.17.txt requirements/build-constraints.txt setup.cfg pyproject.toml
	$(call make_venv,$(COMPAT_VENV),requirements/lock-tf2.17.txt)

venv: $(STAMP)

venv-compat: $(COMPAT_STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmtf demo --out $(DEMO_DIR) $(if $(MANIFEST),--manifest $(MANIFEST))

# The default run (< 15 min on 2 cores) leaves out the multi-process cluster
# tests marked `slow`; CI runs both.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The compatibility stack (TF 2.17.1 + tensorflow-io): data, models, export, serving.
test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -m pytest -q -m "not slow" $(COMPAT_TESTS) $(PYTEST_ARGS)

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
	rm -rf $(VENV) $(COMPAT_VENV) .mmtf_cache runs models
