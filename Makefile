# The two commands of the README:
#   make demo   set up a venv (lessor and its runtime dependencies only) and run lessord on
#               examples/demo.yaml (simulated GPU without a driver)
#   make test   set up a venv with the test extras, the servers the tests use (PostgreSQL, mosquitto) and real vLLM (CPU),
#               then run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test lint system-deps vllm clean install

# The daemon and the demo: lessor and its runtime dependencies only, nothing to compile.
$(VENV)/.base: pyproject.toml
	@echo "==> [1/4] a virtual environment in $(VENV)"
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# CPU machines take torch 2.13.0 (the local CPU build); GPU boxes keep or get their CUDA build.
	@# The one rule, which `make install` runs too.
	@sh systemd/torch.sh "[2/4]" $(PY)
	@echo "==> [3/4] lessor and what lessord needs (no test extras)"
	@# setuptools' notice on every editable install of this layout (package-dir lessor = .) is not for the user.
	PYTHONWARNINGS="ignore:Editable installation" $(PIP) install -q -e .
	touch $@

# The tests' extras on top: llama-cpp-python compiles from source here (about 5 minutes on 2 cores),
# so pip shows what it does.
$(VENV)/.installed: $(VENV)/.base
	@echo "==> the test extras (llama-cpp-python builds from source: about 5 minutes on 2 cores)"
	$(PIP) install --progress-bar off -e '.[test]'
	touch $@

setup: $(VENV)/.installed

var/models/tiny-qwen/config.json: | $(VENV)/.base
	@echo "==> [4/4] the tiny model the demo serves (random weights, generated here: no download)"
	$(PY) -m lessor.engines.tiny_qwen var/models/tiny-qwen

demo: $(VENV)/.base var/models/tiny-qwen/config.json
	@echo "==> lessord on examples/demo.yaml: router http://127.0.0.1:8481/v1, admin http://127.0.0.1:8480"
	$(VENV)/bin/lessord --config examples/demo.yaml --log-level INFO

system-deps:
	sh tests/support/install-system-deps.sh

# Real vLLM for the tests (its CPU build, in a venv of its own): see the script for each workaround.
VLLM_VENV ?= .venv-vllm
vllm:
	sh tests/support/install-vllm.sh $(VLLM_VENV)

test: setup system-deps vllm lint
	$(PY) -m pytest -q

# ruff, then mypy (pyproject.toml has both configurations). mypy runs in build/typecheck, where links
# name the repo root `lessor` (it is lessor's package folder) and bench/ `bench`; with its cache
# (.mypy_cache) a run takes seconds, the first one a minute or two.
lint: setup
	$(VENV)/bin/ruff check .
	@mkdir -p build/typecheck && ln -sfn ../.. build/typecheck/lessor && ln -sfn ../../bench build/typecheck/bench
	cd build/typecheck && $(abspath $(VENV))/bin/mypy --config-file ../../pyproject.toml --cache-dir ../../.mypy_cache

# lessord as a system service (README "Running as a service"), as root: a venv in $(PREFIX)/venv, the
# system user, the state directory, /etc/lessor/lessor.yaml when missing, the unit pointing at the venv.
# Idempotent. PREFIX must be where the unit's hardening lets lessord read (not /home, /root, /tmp).
PREFIX ?= /opt/lessor
install:
	PREFIX=$(PREFIX) sh systemd/install.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) var *.egg-info .pytest_cache .hypothesis .mypy_cache build/typecheck
