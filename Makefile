# `make demo` and `make test` each build .venv on first use and install everything they need.
# Where no CUDA GPU is present, the pinned CPU build of torch goes in first, so that the package's
# `torch` requirement never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CPU_TORCH := torch==2.13.0

.PHONY: demo test test-triton36 gpu-export install clean

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

# What benchmarks/gpu_check.py needs from this machine on a GPU machine without TVM: TVM's CUDA kernels for sm_90
# with their inputs and reference outputs (carry .gpu_export to the GPU run).
# Also the wheels (Python 3.12, x86_64) of what the artifact cases need beyond torch; gpu_check extracts those the
# GPU machine lacks to a temporary directory (nothing is installed there).
# numpy too: torch does not require it, and onnx, ml_dtypes and lmforge's cost model (imported by the cubin export
# path) do.
GPU_WHEELS := numpy onnx protobuf ml_dtypes safetensors
gpu-export: $(STAMP)
	TVM_NUM_THREADS=1 $(PY) -m lmforge.backends.tvm.gpu_check export .gpu_export/tvm --arch sm_90
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
		--platform manylinux2014_x86_64 -d .gpu_export/wheels $(GPU_WHEELS)

# The Triton tests again under Triton 3.6, the version of the GPU machines this project is lent (by hand, not
# in CI: it downloads a second Triton). Its interpreter needs numpy < 2.4 (it int()s 1-element arrays).
VENV36 := .venv-triton36
test-triton36:
	test -x $(VENV36)/bin/python || $(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(VENV36)/bin/python -m pip install -q $(CPU_TORCH); fi
	$(VENV36)/bin/python -m pip install -q 'triton==3.6.0' 'numpy<2.4'
	$(VENV36)/bin/python -m pip install -q -e '.[test]' 'triton==3.6.0' 'numpy<2.4'
	$(VENV36)/bin/python -m pytest -n 2 tests/backends/triton tests/export/test_triton_kernels.py \
		tests/export/test_kernel_files.py tests/search/test_kernel_knobs.py tests/test_gpu_cases_cpu.py

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info
