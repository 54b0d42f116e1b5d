# Developer entry points. `make test` and `make demo` bootstrap .venv on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

# Tests use small tensors: few threads and a passive OpenMP wait keep them fast.
OMP_NUM_THREADS ?= 2

.PHONY: venv test demo docs bench clean

venv: $(STAMP)

# torch and torchvision are pinned here, not in pyproject.toml, so that users keep
# whichever torch>=2.4 build (CPU or CUDA) suits them.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --progress-bar off -e '.[test,docs]'
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --progress-bar off -e '.[bench]'
	touch $@

test: venv
	OMP_NUM_THREADS=$(OMP_NUM_THREADS) OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

# The main job: Glow with spline couplings and variational dequantization on the offline
# digits set, through the flowpack command. A second `make demo` resumes the run in
# demo_output (finishing it if it was interrupted) and prints its results again.
DEMO_ARGS ?= --data digits --flow glow --epochs 30 --threads 1

demo: venv
	@if [ -f demo_output/checkpoints/last.pt ]; then \
		OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/flowpack train --resume --out demo_output; \
	else \
		OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/flowpack train $(DEMO_ARGS) --out demo_output; \
	fi

docs: venv
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: $(BENCH_STAMP)
	$(PY) bench/peers.py

clean:
	rm -rf docs/_build demo_output build dist .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
