# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean-demo

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch pinned to the CPU wheel (an unpinned torch would pull a multi-GB CUDA build).
	$(VPY) -m pip install -q -c constraints-cpu.txt torch
	$(VPY) -m pip install -q -c constraints-cpu.txt -e '.[test]'
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
