# edgepipe: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
DEV := .venv-devices
HOSTPY := $(VENV)/bin/python
PYTEST := $(HOSTPY) -m pytest

.PHONY: setup py37 system-deps test test-arm64 demo demo-down bench clean-venvs

# Host venv (edgepipe and its dependencies, TensorFlow for conversion: the `tensorflow` extra) plus device venvs
# WITHOUT TensorFlow, as bare devices have them.
setup: $(VENV)/.stamp $(DEV)/litert/.stamp $(DEV)/tflite-runtime/.stamp $(DEV)/numpy-only/.stamp py37

# Coral's Mendel Linux ships Python 3.7: when this machine has a 3.7 interpreter, the agent is also tested on it.
PY37 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.7*/bin/python3.7) $(shell command -v python3.7 2>/dev/null))
py37:
	@if [ -n "$(PY37)" ] && [ ! -f $(DEV)/py37/.stamp ]; then \
	  $(PY37) -m venv $(DEV)/py37 && $(DEV)/py37/bin/pip install -q numpy tflite-runtime && touch $(DEV)/py37/.stamp \
	  || echo "py37 device venv could not be built; its test will be skipped with the reason"; \
	elif [ -z "$(PY37)" ]; then echo "no Python 3.7 here: the Python 3.7 agent test will be skipped"; fi

$(VENV)/.stamp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[tensorflow,dev]'
	$(VENV)/bin/pip install -q --no-deps 'tf-keras==2.21.0'
	touch $@

$(DEV)/litert/.stamp:
	$(PY) -m venv $(DEV)/litert
	$(DEV)/litert/bin/pip install -q 'ai-edge-litert==2.3.0' 'numpy>=2'
	touch $@

$(DEV)/tflite-runtime/.stamp:
	$(PY) -m venv $(DEV)/tflite-runtime
	$(DEV)/tflite-runtime/bin/pip install -q 'tflite-runtime==2.14.0' 'numpy<2'
	touch $@

$(DEV)/numpy-only/.stamp:
	$(PY) -m venv $(DEV)/numpy-only
	$(DEV)/numpy-only/bin/pip install -q numpy
	touch $@

# apt packages: openssh-server (loopback fleet), chromium (report render test), qemu/debootstrap (emulated Pi).
system-deps:
	bash scripts/system_deps.sh --all

# Two pytest workers, each test file whole in one (its module fixtures, fleets and servers stay together);
# TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
test: setup
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile

test-arm64: setup
	$(PYTEST) -o addopts=-ra -m arm64 tests/arm64 --junitxml=.pytest-arm64.xml

demo: setup
	bash scripts/demo.sh $(DEMO_FLAGS)

demo-down:
	bash scripts/demo.sh --down $(DEMO_FLAGS)

bench: setup
	$(HOSTPY) bench/run_all.py

clean-venvs:
	rm -rf $(VENV) $(DEV)
