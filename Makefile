# vmapi — targets a newcomer can guess. `make run` and `make test` do all set-up on a
# fresh Debian 12 machine as root: missing Debian packages, the virtualenv, the database.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
FLASK := $(BIN)/flask --app wsgi
SYSTEM_PACKAGES := libvirt-dev pkg-config gcc python3-dev python3-venv libvirt-clients qemu-utils
TEST_PACKAGES := nginx-light
BENCH_PACKAGES := wrk
PYTEST_ARGS ?=

.PHONY: help run test lint format bench db-upgrade system-packages venv clean

help:
	@echo "make run         install what is missing, migrate, print an admin token, serve on $(HOST):$(PORT)"
	@echo "make test        install what is missing, start PostgreSQL and libvirtd, run the whole suite"
	@echo "make lint        ruff check + format check"
	@echo "make format      ruff format + autofix"
	@echo "make bench       benchmarks (figures go to docs/benchmarks.md; BENCH=\"placement ...\" for some)"
	@echo "make db-upgrade  apply migrations and seed the default rows"
	@echo "make clean       remove the virtualenv and caches"

system-packages:
	@scripts/ensure-packages.sh $(SYSTEM_PACKAGES)

$(STAMP): requirements.txt requirements-dev.txt | system-packages
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $(STAMP)

venv: system-packages $(STAMP)

db-upgrade: venv
	@$(FLASK) db upgrade
	@$(FLASK) vmapi seed

# The embedded default: SQLite in instance/, a local node on libvirt's test driver.
run: venv db-upgrade
	@$(FLASK) vmapi node list --quiet | grep -q . || $(FLASK) vmapi node add \
	  --fqdn local.vmapi.test --libvirt-uri test:///default --virt-method QEMU \
	  --ipv4-addr-ext 192.0.2.10/24 --ipv4-gw-ext 192.0.2.1 \
	  --ipv6-addr-ext 2001:db8::10/64 --ipv6-gw-ext 2001:db8::1
	@echo "admin token (shown once; keep it):"
	@$(FLASK) vmapi token create --admin 2>/dev/null | tail -n 1
	@echo "serving on http://$(HOST):$(PORT)/api/v1/  (Ctrl-C stops)"
	@# One process (with threads): the embedded test driver keeps its domains per process.
	@$(BIN)/gunicorn -c deploy/gunicorn.conf.py --workers 1 --threads 4 --bind $(HOST):$(PORT) wsgi:app

test: venv
	@scripts/ensure-packages.sh $(TEST_PACKAGES)
	@PG_URL=$$(scripts/ensure-postgres.sh) && scripts/ensure-libvirtd.sh && \
	  VMAPI_TEST_PG_URL="$$PG_URL" $(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .

format: venv
	@$(BIN)/ruff check --fix .
	@$(BIN)/ruff format .

# BENCH= picks some of: placement listing overhead hypervisor memory scaleout images
bench: venv
	@scripts/ensure-packages.sh $(BENCH_PACKAGES)
	@PG_URL=$$(scripts/ensure-postgres.sh) && scripts/ensure-libvirtd.sh && \
	  VMAPI_TEST_PG_URL="$$PG_URL" $(BIN)/python -m bench $(BENCH)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
