PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= etc/config.yml

.PHONY: run test unit integration lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/twistd --pidfile= -n regmirror -c $(CONFIG)

test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check regmirror twisted tests bench
	$(BIN)/ruff format --check regmirror twisted tests bench
	$(BIN)/mypy

bench: $(STAMP)
	@command -v wrk >/dev/null && command -v ab >/dev/null && command -v docker-registry >/dev/null && command -v skopeo >/dev/null && command -v curl >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-registry skopeo wrk apache2-utils curl)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
