PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= etc/config.yml

.PHONY: run test unit integration lint bench clean debs-test debs-bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/twistd --pidfile= -n regmirror -c $(CONFIG)

# The Debian packages the tests and benchmarks need (the list is in scripts/ensure-debs):
# installed when run as root, else one line names them and make stops.
debs-test debs-bench: debs-%:
	@scripts/ensure-debs $*

test: debs-test $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

integration: debs-test $(STAMP)
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check regmirror twisted tests bench
	$(BIN)/ruff format --check regmirror twisted tests bench
	$(BIN)/mypy

bench: debs-bench $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
