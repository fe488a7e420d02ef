# Sluice: `make run` brings the platform up on embedded PostgreSQL and Redis; `make test`
# runs the checks and the whole suite against real services and worker processes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: setup run check test bench clean-var

setup: $(STAMP)

# Reinstall only when a requirements file changed since the last install.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

run: setup
	$(PY) -m sluice.launcher

check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

test: check
	$(PY) -m pytest

bench: setup
	$(PY) -m bench all --quick

clean-var:
	rm -rf var/test-*
