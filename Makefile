# The two commands of the README: `make run` and `make test`.  Both build what they need.
#
#   make run         the demo: controller, gateway and a web page, until Ctrl-C (arvproxy/demo.py)
#   make test        every test; as root on a fresh Debian machine it installs what they need
#   make check       lint, types and tests
#   make test TESTS=tests.test_policy     one module (or tests.test_policy.PolicyTests.test_x)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTS  ?= tests
# Parallel workers for trial; every test uses free loopback ports and its own temp directory.
JOBS   ?= 2

.PHONY: run test check lint typecheck bench clean system-packages

$(STAMP): setup.cfg pyproject.toml twisted/plugins/arvproxy_services.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Not editable: twistd does not find plugins through PEP 660 import hooks.
	$(BIN)/pip install --quiet '.[dev]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

# The source tree comes first on the path, so tests and twistd use the working copy.
export PYTHONPATH := $(CURDIR)

# The demo runs its page in a real Docker container when an engine can be had (installed and
# started as root on a fresh machine); without one it says why and uses a loopback page.
run: $(STAMP)
	-scripts/ensure-docker
	$(BIN)/python -m arvproxy.demo

# What the tests need from the system: headless Chromium for the browser tests, a Docker
# engine for the container runtime tests.  Each script does nothing when all is there.
system-packages:
	scripts/ensure-packages chromium chromium-driver
	scripts/ensure-docker

test: $(STAMP) system-packages
	$(BIN)/trial --jobs=$(JOBS) $(TESTS)

lint: $(STAMP)
	$(BIN)/ruff check arvproxy tests twisted
	$(BIN)/ruff format --check arvproxy tests twisted

typecheck: $(STAMP)
	$(BIN)/mypy arvproxy

check: lint typecheck test

bench: $(STAMP)
	scripts/ensure-bench-tools
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info test-artifacts
