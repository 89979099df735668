# Two commands work on a fresh CPU-only machine: `make demo` and `make test`.
# The venv pins the CPU build of torch (2.13.0 is on local disk) and triton 3.6 with
# numpy < 2.3 (docs/design/TOOLCHAIN.md: triton 3.6's interpreter breaks on numpy >= 2.3).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu bench-cpu clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.3"
	$(VPY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m tileattn.cli demo

test: $(STAMP)
	$(VPY) -m pytest -q -n 2 -p no:cacheprovider tests

# On the GPU machine: its own python3 (torch + triton present, no package index, no venv).
# The whole suite: Triton cases run compiled on the GPU, gpu-marked cases are no longer skipped.
test-gpu:
	PYTHONPATH=. $(PY) -m pytest -q -n 8 -p no:cacheprovider tests

bench-cpu: $(STAMP)
	$(VPY) -m benchmarks.run --set cpu --out results/cpu.json

clean:
	rm -rf $(VENV) results .pytest_cache
