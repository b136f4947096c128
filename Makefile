# The two commands of README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LIBTPU_DIR := $(VENV)/libtpu
LIBTPU_STAMP := $(LIBTPU_DIR)/.installed
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_WORKDIR ?= runs/fashion_mnist

.PHONY: setup shellcheck test demo fashion-mnist lint clean

# A venv with the pinned requirements, the test tools and this package (editable). jax 0.10.2
# needs Python 3.11 or newer: `make PYTHON=python3.12 ...` picks another interpreter.
$(STAMP): requirements.txt requirements-test.txt setup.cfg pyproject.toml
	@echo "== set-up: $(VENV) with the pinned packages (a few minutes the first time, then nothing)"
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "error: sagan_jax needs Python 3.11 or newer; PYTHON=$(PYTHON) is missing or older." \
	    "Install it (Debian/Ubuntu: apt-get install python3.11 python3.11-venv) and run" \
	    "make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP) shellcheck

# The launch scripts' tests lint them with shellcheck: Debian's package, installed when missing and
# apt-get can be used as root. Without it those tests skip and say why.
shellcheck:
	@command -v shellcheck >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -q && apt-get install -y -q shellcheck) || \
	      echo "note: could not install shellcheck; the launch scripts' shellcheck tests will skip"; \
	  else \
	    echo "note: shellcheck is missing (as root: apt-get install -y shellcheck);" \
	      "the launch scripts' shellcheck tests will skip"; \
	  fi; \
	}

# libtpu for the TPU-slice compile test, in its own folder (requirements-tpu-compile.txt says why).
$(LIBTPU_STAMP): requirements-tpu-compile.txt $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(LIBTPU_DIR) -r requirements-tpu-compile.txt
	touch $(LIBTPU_STAMP)

# Two pytest workers, a test file each at a time (module fixtures compile once per file); the ten
# slowest tests are listed at the end. TEST_WORKERS=0 runs the files in this process.
TEST_WORKERS ?= 2
test: setup $(LIBTPU_STAMP)
	SAGAN_LIBTPU_DIR=$(abspath $(LIBTPU_DIR)) XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=10

# Installs Debian's dataset-fashion-mnist when its files are missing and apt-get can be used.
fashion-mnist:
	@FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) bash launch/get_fashion_mnist.sh

# The stages (data, classifier, training, evaluation) with a header, progress and a summary:
# sagan_jax/demo.py. The classifier is trained once into $(DEMO_WORKDIR)/classifier.npz.
demo: setup fashion-mnist
	$(PY) -m sagan_jax.demo --workdir=$(DEMO_WORKDIR) --fashion_mnist_dir=$(FASHION_MNIST_DIR)

# flake8 with setup.cfg's settings (tests/test_style.py runs it too).
lint: setup
	$(PY) -m flake8 sagan_jax configs tests

clean:
	rm -rf $(VENV) build *.egg-info
