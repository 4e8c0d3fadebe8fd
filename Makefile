# Two commands for a fresh machine: `make run` and `make test`. Each creates what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build by default. GPU users: make run TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
ARGS ?=

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: run test test-release lint install install-dev browser-deps team-deps team-up team-down clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, so that nothing pulls a multi-GB CUDA build on a CPU machine
	$(BIN)/pip install -q $(TORCH_FLAGS) torch==$(TORCH_VERSION)

$(VENV)/.installed: $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install  ## train on the built-in demo shop (ARGS="--data ... --format ..." for your own)
	$(BIN)/shoprank train $(ARGS)

test: install-dev browser-deps  ## the default test suite (slow and gpu tests excluded)
	$(BIN)/pytest -q $(ARGS)

browser-deps:  ## Debian's Chromium and ChromeDriver for the browser tests, when missing
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium chromium-driver; \
	fi

test-release: install-dev team-deps browser-deps  ## the slow release-loop tests: the team setup (PostgreSQL, servers, workers), a killed train resumed, a release and a catalogue update killed at each step
	$(BIN)/pytest -q -m slow tests/test_team.py tests/test_resume.py tests/test_release_loop.py tests/test_release_faults.py tests/test_release_engine.py tests/test_catalogue.py tests/test_monitor_flow.py tests/test_browser.py

team-deps:  ## Debian's PostgreSQL for the team setup, when missing
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y postgresql; \
	fi

team-up: install team-deps  ## PostgreSQL, a Prefect server and an MLflow server on 127.0.0.1 (data in .team/)
	$(BIN)/shoprank team up $(ARGS)

team-down: install  ## stop them (their data stays in .team/)
	$(BIN)/shoprank team down $(ARGS)

lint: install-dev
	$(BIN)/ruff check flows tasks models tests benchmarks

clean:
	rm -rf $(VENV) outputs
