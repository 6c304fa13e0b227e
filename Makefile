# unitbox — every target prints what it does. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
# libpq5: psycopg's library, for `store = "postgresql://…"` (imported only then).
APT_PACKAGES := libsystemd-dev pkg-config python3-venv python3-dev gcc systemd dbus curl util-linux iproute2 libpq5
# The browser tests (tests/integration/test_playground_live.py) drive Debian's chromium with Playwright.
# The store's contract tests and the daemon on PostgreSQL start throw-away servers of Debian's postgresql.
TEST_APT_PACKAGES := chromium postgresql
PLAYGROUND := daemon/unitbox/playground/index.html
PYTEST_ARGS ?=
# Names this run's test hosts (ubx-<tag>-…) so the leftover check sees only its own.
ifndef UBX_TEST_RUN
UBX_TEST_RUN := t$(shell date +%s%N | tail -c 10)
endif
export UBX_TEST_RUN

.PHONY: help deps test-deps venv lint playground test test-fast docs run clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

deps: .cache/apt.stamp  ## install the Debian packages the build and tests need
.cache/apt.stamp: Makefile
	@echo "==> checking Debian packages: $(APT_PACKAGES)"
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "==> apt-get install $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@mkdir -p .cache && touch $@

test-deps: .cache/test-apt.stamp  ## install the Debian packages only the tests need (chromium, postgresql)
.cache/test-apt.stamp: .cache/apt.stamp Makefile
	@missing=$$(for p in $(TEST_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "==> apt-get install $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@touch $@

# The playground page (web/): npm ci from the committed lock, then esbuild into
# daemon/unitbox/playground/ (not committed; shipped in the package). npm only
# at build time: the page fetches nothing at run time.
playground: $(PLAYGROUND)  ## build the playground page (web/, esbuild) into daemon/unitbox/playground/
web/node_modules/.installed: web/package.json web/package-lock.json
	@command -v npm >/dev/null || { echo "==> apt-get install nodejs npm"; export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -q && apt-get install -y -q --no-install-recommends nodejs npm; }
	@echo "==> npm ci (web/, from package-lock.json)"
	@cd web && npm ci --no-audit --no-fund --loglevel=error
	@touch $@
$(PLAYGROUND): web/node_modules/.installed web/build.mjs $(wildcard web/src/*)
	@echo "==> esbuild: web/src → daemon/unitbox/playground/"
	@cd web && node build.mjs

venv: $(VENV)/.installed  ## create .venv with unitbox and its test tools
$(VENV)/.installed: pyproject.toml .cache/apt.stamp
	@echo "==> creating $(VENV) with $(PYTHON)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> installing unitbox (editable) and its test dependencies"
	@$(BIN)/pip install --disable-pip-version-check -q --progress-bar on -U pip
	@$(BIN)/pip install --disable-pip-version-check --progress-bar on -q -e '.[test]'
	@$(BIN)/python -c 'import unitbox, pystemd, aiohttp, pydantic, prometheus_client' && touch $@

lint: venv  ## ruff and mypy --strict
	@echo "==> ruff check"
	@$(BIN)/ruff check daemon tests
	@echo "==> mypy --strict daemon/"
	@$(BIN)/mypy

test: venv lint playground test-deps  ## everything: lint, unit, API, integration (systemd test host) and the Debian VM tier
	@echo "==> pytest (unit, API, integration on the systemd test host; stores on SQLite and a throw-away PostgreSQL)"
	@UBX_REQUIRE_POSTGRESQL=1 $(BIN)/pytest -ra $(PYTEST_ARGS)
	@echo "==> checking that no test host was left behind"
	@bash tests/testhost/check-clean.sh
	@$(MAKE) --no-print-directory vm-test

test-fast: venv lint  ## the inner loop, seconds: lint, unit and API tiers (no test host)
	@echo "==> pytest tests/unit tests/api (lint again inside: tests/unit/test_lint.py)"
	@$(BIN)/pytest -ra tests/unit tests/api $(PYTEST_ARGS)

docs: venv  ## rewrite the tables of docs/ generated from the code (tests/unit/test_docs.py checks them)
	@PYTHONPATH=daemon $(BIN)/python -m tests.support.doctables --write

run: venv playground  ## run the daemon on 127.0.0.1:8080 (in a test host when PID 1 is not systemd)
	@bash scripts/run.sh

# Debian package and VM tier (packaging/deb.mk), benchmark (bench/bench.mk).
-include packaging/deb.mk
-include bench/bench.mk

clean:  ## remove the venv and caches
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache dist build web/node_modules daemon/unitbox/playground
