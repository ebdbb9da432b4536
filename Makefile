# The two set-up commands of the README. Each makes its own virtual environment
# and installs what it needs, so both work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
NEWEST_VENV ?= .venv-newest
PYTEST_ARGS ?=

.PHONY: serve test test-newest bench proto clean

# One daemon on embedded defaults: 127.0.0.1:7600, ./kvstore-data, 1 GiB memory tier.
serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/kvstore-server $(ARGS)

$(SERVE_VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard kvstore/_native/src/*)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet ".[server]"
	touch $@

# The whole suite: unit, integration (in-process daemons), fault (subprocess
# daemons, kill -9), bench smoke, on the oldest grpcio and protobuf kvstore declares.
# Long soak forms: make test PYTEST_ARGS=--runslow
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard kvstore/_native/src/*)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[server,test,bench]" -c tests/lowest-deps.txt
	command -v etcd >/dev/null 2>&1 || test -x /usr/bin/etcd || { s=$$(test "$$(id -u)" = 0 || echo sudo -n); $$s apt-get update -qq && $$s env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server; } || echo "etcd not installed: the etcd membership tests will be skipped"
	touch $@

# The unit, integration and security tests again on the newest grpcio and protobuf releases.
test-newest: $(NEWEST_VENV)/.installed
	$(NEWEST_VENV)/bin/python -m pytest -q tests/unit tests/integration tests/security $(PYTEST_ARGS)

$(NEWEST_VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard kvstore/_native/src/*)
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/pip install --quiet --upgrade pip
	$(NEWEST_VENV)/bin/pip install --quiet -e ".[server]" "pytest>=8,<10" "pytest-asyncio>=0.24,<2" "pytest-timeout>=2.3,<3" \
		"hypothesis>=6.100,<7" "numpy>=1.26" "cryptography>=42,<47"
	$(NEWEST_VENV)/bin/pip install --quiet --upgrade grpcio grpcio-health-checking grpcio-reflection protobuf
	touch $@

bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench $(ARGS)

proto: $(VENV)/.installed
	$(VENV)/bin/python protos/generate.py

clean:
	rm -rf $(VENV) $(SERVE_VENV) $(NEWEST_VENV) build dist .pytest_cache
