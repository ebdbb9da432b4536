# The two set-up commands of the README. Each makes its own virtual environment
# and installs what it needs, so both work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
PYTEST_ARGS ?=

.PHONY: serve test bench proto clean

# One daemon on embedded defaults: 127.0.0.1:7600, ./kvstore-data, 1 GiB memory tier.
serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/kvstore-server $(ARGS)

$(SERVE_VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard kvstore/_native/src/*)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet .
	touch $@

# The whole suite: unit, integration (in-process daemons), fault (subprocess
# daemons, kill -9), bench smoke. Long soak forms: make test PYTEST_ARGS=--runslow
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard kvstore/_native/src/*)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test,bench]"
	command -v etcd >/dev/null 2>&1 || test -x /usr/bin/etcd || { s=$$(test "$$(id -u)" = 0 || echo sudo -n); $$s apt-get update -qq && $$s env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server; } || echo "etcd not installed: the etcd membership tests will be skipped"
	touch $@

bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench $(ARGS)

proto: $(VENV)/.installed
	$(VENV)/bin/python protos/generate.py

clean:
	rm -rf $(VENV) $(SERVE_VENV) build dist .pytest_cache
