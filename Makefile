# The two commands of the README: `make run` and `make test`.  Both build what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTS  ?= tests

.PHONY: run test check lint typecheck bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Not editable: twistd does not find plugins through PEP 660 import hooks.
	$(BIN)/pip install --quiet '.[dev]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

# The source tree comes first on the path, so tests and twistd use the working copy.
export PYTHONPATH := $(CURDIR)

run: $(STAMP)
	$(BIN)/python -m arvproxy.demo

test: $(STAMP)
	$(BIN)/trial --jobs=2 $(TESTS)

lint: $(STAMP)
	$(BIN)/ruff check arvproxy tests twisted
	$(BIN)/ruff format --check arvproxy tests twisted

typecheck: $(STAMP)
	$(BIN)/mypy arvproxy

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info
