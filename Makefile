# `make demo` and `make test` each build .venv on first use and install everything they need.
# Where no CUDA GPU is present, the pinned CPU build of torch goes in first, so that the package's
# `torch` requirement never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CPU_TORCH := torch==2.13.0

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(CPU_TORCH); fi
	$(PY) -m pip install -q -e '.[test,tvm-tune]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info
