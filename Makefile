# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean-demo

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel (an unpinned torch would pull a CUDA build).
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The embedded end-to-end reproduction on one CPU (see README).
demo: $(STAMP)
	$(VPY) -m experiments.demo --out runs/demo

# Every test, slow ones included (CI runs exactly this).
test: $(STAMP)
	$(VPY) -m pytest -q tests

test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow and not slurm" tests

clean-demo:
	rm -rf runs/demo
