# The two commands of the README:
#   make demo   set up a venv and run lessord on examples/demo.yaml (simulated GPU without a driver)
#   make test   set up a venv, the servers the tests use (PostgreSQL, mosquitto) and real vLLM (CPU),
#               then run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test system-deps vllm clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# CPU machines take torch 2.13.0 (the local CPU build); GPU boxes keep or get their CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

var/models/tiny-qwen/config.json: | $(VENV)/.installed
	$(PY) -m lessor.engines.tiny_qwen var/models/tiny-qwen

demo: setup var/models/tiny-qwen/config.json
	$(VENV)/bin/lessord --config examples/demo.yaml --log-level INFO

system-deps:
	sh tests/install-system-deps.sh

# Real vLLM for the tests (its CPU build, in a venv of its own): see the script for each workaround.
VLLM_VENV ?= .venv-vllm
vllm:
	sh tests/install-vllm.sh $(VLLM_VENV)

test: setup system-deps vllm
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) var *.egg-info .pytest_cache .hypothesis
