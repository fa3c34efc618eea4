# The README's two commands: `make serve` and `make test`. Both create/reuse .venv with pip.
# torch is pinned only here (constraints.txt), so the package keeps an open torch requirement
# and pip takes the CPU wheel on this machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test install-server install-dev bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.server-installed: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[server]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[server,dev]'
	# OpenRLHF's full dependency set (deepspeed, vllm, ray) does not install on CPU; its client
	# code needs only aiohttp, so the tests take the real package without its dependencies.
	$(PY) -m pip install --quiet --no-deps 'openrlhf==0.11.*'
	touch $(VENV)/.server-installed $@

install-server: $(VENV)/.server-installed
install-dev: $(VENV)/.dev-installed

serve: $(VENV)/.server-installed
	$(VENV)/bin/hero-rewards serve --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-installed
	$(PY) -m pytest

bench: $(VENV)/.dev-installed
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
