# Rill: `make run` to start, `make test` to check. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
# npm's eventsource for tests/test_sse_clients.py, pinned in tests/sse_clients/package-lock.json.
NODE_CLIENTS := tests/sse_clients/node_modules/.installed

.PHONY: run test lint fmt bench backup clean vendor vendor-check install-service

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME): requirements.txt | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(DEV): requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(RUNTIME) $@

run: $(RUNTIME)
	$(BIN)/python -m server

$(NODE_CLIENTS): tests/sse_clients/package-lock.json
	cd tests/sse_clients && npm ci --no-audit --no-fund --silent
	touch $@

test: $(DEV) $(NODE_CLIENTS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(DEV)
	$(BIN)/ruff check server tests bench
	$(BIN)/ruff format --check server tests bench
	$(BIN)/mypy

fmt: $(DEV)
	$(BIN)/ruff format server tests bench
	$(BIN)/ruff check --fix server tests bench

# Rill against `direct` and a naive relay, same run; prints a Markdown table, writes
# bench/results/latest.json. About 3 minutes on 2 cores. BENCH_ARGS="--quick" for a smoke run.
bench: $(DEV)
	$(BIN)/python -m bench $(BENCH_ARGS)

# A consistent copy of the conversations database (SQLite), safe while Rill runs:
#   make backup BACKUP=/path/to/rill-backup.db   (the database: RILL_DATABASE_URL, the
# config's [storage] url, or rill.db in the state directory; PostgreSQL: use pg_dump).
backup: $(RUNTIME)
	$(if $(BACKUP),,$(error make backup needs BACKUP=/path/to/copy.db))
	$(BIN)/python -m server.store backup $(BACKUP)

# Browser libraries: pinned in web/vendor/package-lock.json, copied into web/static/vendor/ (committed).
# Needs Node/npm only when updating them; see web/vendor/README.md.
vendor:
	cd web/vendor && npm ci --no-audit --no-fund && node vendor.mjs

vendor-check:
	cd web/vendor && npm ci --no-audit --no-fund && node vendor.mjs --check

# Install or upgrade Rill as a systemd service behind nginx (Debian 12/13); see README.md:
#   make install-service INSTALL_ARGS="--domain chat.example.com --email you@example.com"
# (sudo only when not already root: a fresh VPS often has no sudo).
install-service:
	$(if $(filter 0,$(shell id -u)),,sudo) deploy/install.sh $(INSTALL_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis tests/sse_clients/node_modules
