# Sluice: `make run` brings the platform up on embedded PostgreSQL and Redis; `make test`
# runs the checks and the whole suite against real services and worker processes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
# The browser's vendored scripts, copied out of node_modules; neither is committed.
VENDOR := static/vendor
VENDOR_STAMP := $(VENDOR)/.stamp

.PHONY: setup run check test bench clean-var

setup: $(STAMP) $(VENDOR_STAMP)

# Reinstall only when a requirements file changed since the last install.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# htmx and the graph editor's diagram library (AntV X6) come from npm, pinned in
# package-lock.json, and are served from static/ like our own files: no CDN at run time, no
# bundler (both ship a browser build). Redone only when the lock file changed; `npm ci`
# installs exactly what the lock says.
$(VENDOR_STAMP): package-lock.json
	npm ci --no-audit --no-fund
	mkdir -p $(VENDOR)
	cp node_modules/htmx.org/dist/htmx.min.js $(VENDOR)/htmx.min.js
	cp node_modules/@antv/x6/dist/x6.min.js $(VENDOR)/x6.min.js
	touch $(VENDOR_STAMP)

run: setup
	$(PY) -m sluice.launcher

# lint-imports holds the code to DESIGN's layer table (pyproject.toml, tests/layers.py).
check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy .

test: check
	$(PY) -m pytest

bench: setup
	$(PY) -m bench all --quick

clean-var:
	rm -rf var/test-*
