PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= etc/config.yml

.PHONY: run test unit integration lint bench clean debs-test debs-bench faults

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

# The fault suite's long run (not in CI: ~15 min): more rounds, clients and seconds than
# its short version in `make test`; each test appends its figures to FIGURES, then
# docs/reliability.md is written from them. FAULTS=tests/faults/test_x.py::test_y runs
# one test and updates its row only (the whole suite starts the figures afresh).
FAULTS ?= tests/faults
FIGURES ?= docs/reliability.jsonl

faults: debs-test $(STAMP)
	$(if $(filter tests/faults tests/faults/,$(FAULTS)),rm -f $(FIGURES))
	REGMIRROR_FAULTS_LONG=1 REGMIRROR_FIGURES=$(abspath $(FIGURES)) \
		$(BIN)/pytest -q -p no:cacheprovider $(FAULTS) $(PYTEST_ARGS)
	$(BIN)/python -m tests.faults.report $(FIGURES) > docs/reliability.md.new
	mv docs/reliability.md.new docs/reliability.md

lint: $(STAMP)
	$(BIN)/ruff check regmirror twisted tests bench
	$(BIN)/ruff format --check regmirror twisted tests bench
	$(BIN)/mypy

bench: debs-bench $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
