# The README's two commands: `make demo` (set up, then run the main job) and `make test` (set up, then the tests).
# Set-up happens once, into .venv; it installs torch==2.13.0 (the CPU wheel) where there is no CUDA so that a
# laptop or CI never downloads multi-GB CUDA wheels, and whatever torch pip picks where nvidia-smi sees a GPU.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q torch; \
	else \
	  $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node 1 train/main.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	bash bench/run_all.sh

clean:
	rm -rf $(VENV) .pytest_cache
