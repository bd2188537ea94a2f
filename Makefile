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
# busybox-static ... qemu-utils: the test guest (tests/guest/) built at test time, with
# libc6-dev (and SYSTEM_PACKAGES' gcc) for its static helpers; tcpdump: what arrives in a
# test's network namespace from the guests (tests/hypervisor/capture.py); nftables: nft
# reads the host's ruleset, where libvirt's network filters leave their frame
# (tests/hypervisor/ruleset.py);
# cloud-init, openssh-client and genisoimage: the NoCloud seed's tests read it with
# cloud-init's own parsers, make keys with ssh-keygen and read the ISO with isoinfo;
# novnc, chromium: the console's web client, opened by a headless browser in the tests;
# ceph-mon, ceph-mgr, ceph-osd, ceph-common: the tests' one-node Ceph cluster (its daemons,
# and the ceph/rbd tools), started by the test session in a folder of its own (no unit
# starts on install); CEPH_BINDINGS (below); qemu-block-extra: QEMU's rbd block driver (guests and qemu-img on
# RBD images); libvirt-daemon-driver-storage-rbd: libvirt's rbd storage pools (loaded by
# a libvirtd started after it: scripts/ensure-libvirtd.sh restarts an idle one);
# etcd-server, patroni, haproxy: the failover tier's database hosts and the HAProxy in
# front of them (tests/failover; started by the tests, no unit starts on install)
# python3-rados, python3-rbd: Ceph's Python bindings, the API host's in-process Ceph
# client (vmapi/hypervisor/librbd.py: an RBD root disk's clone); built for Debian's Python
# 3.11 and on no package index, so scripts/link-ceph-bindings.sh links exactly these two
# modules into the virtualenv (`make venv`, and after `make run`/`make test`/`make bench`
# install them). Not pinned (no Debian package is): the link checks the ABI tag.
CEPH_BINDINGS := python3-rados python3-rbd
TEST_PACKAGES := nginx-light busybox-static cpio grub-pc-bin grub-common xorriso mtools \
  libc6-dev tcpdump nftables qemu-utils cloud-init openssh-client genisoimage novnc chromium \
  ceph-mon ceph-mgr ceph-osd ceph-common $(CEPH_BINDINGS) qemu-block-extra \
  libvirt-daemon-driver-storage-rbd \
  etcd-server patroni haproxy
# nginx, etcd, Patroni, HAProxy: BENCH=failover; Ceph's bindings: BENCH=rbd
BENCH_PACKAGES := wrk nginx-light etcd-server patroni haproxy $(CEPH_BINDINGS)
PYTEST_ARGS ?=
# Modules run in a random order and so do the tests of each module (pytest-random-order;
# the seed is printed at the top: `make test ORDER=--random-order-seed=N` runs that order
# again, `ORDER=` keeps the files' order). The 30 slowest steps are listed at the end.
ORDER ?= --random-order-bucket=module
DURATIONS ?= --durations=30
# Three pytest-xdist workers on two cores: the hypervisor tier in two groups side by side
# (they wait for TCG guests and daemons about half the time), every other test on whichever
# worker is free (groups in tests/conftest.py). `WORKERS=` runs in one process.
WORKERS ?= -n 3
# The inner loop: no real hypervisor (tests/hypervisor), no concurrency tier (gunicorn and
# nginx, tests/concurrency), no served README walk (tests/docs), no failover tier (etcd,
# Patroni, two API hosts in network namespaces, tests/failover); markers set by
# tests/conftest.py
FAST_TIERS := not hypervisor and not concurrency and not docs and not failover

.PHONY: help run test test-fast lint format bench db-upgrade system-packages venv clean

help:
	@echo "make run         install what is missing, migrate, add a local test node and address"
	@echo "                 ranges, print an admin token, serve on $(HOST):$(PORT)"
	@echo "make test        install what is missing, start PostgreSQL and libvirtd, run the whole suite"
	@echo "                 (random order, seed printed; ORDER=--random-order-seed=N repeats one)"
	@echo "make test-fast   the suite without the real hypervisor, gunicorn/nginx and README tiers"
	@echo "make lint        ruff check + format check"
	@echo "make format      ruff format + autofix"
	@echo "make bench       benchmarks (runs go to docs/benchmarks-history.md; BENCH=\"placement ...\" for some)"
	@echo "make db-upgrade  apply migrations and seed the default rows"
	@echo "make clean       remove the virtualenv and caches"

system-packages:
	@scripts/ensure-packages.sh $(SYSTEM_PACKAGES)

$(STAMP): requirements.txt requirements-dev.txt | system-packages
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $(STAMP)

venv: system-packages $(STAMP)
	@scripts/link-ceph-bindings.sh $(VENV)

db-upgrade: venv
	@$(FLASK) db upgrade
	@$(FLASK) vmapi seed

# The embedded default: SQLite in instance/, a local node on libvirt's test driver,
# address ranges for new VMs, a new admin token (the script is idempotent; the README's
# walk test sets up its server with it too).
run: venv
	@scripts/ensure-packages.sh $(CEPH_BINDINGS) && scripts/link-ceph-bindings.sh $(VENV)
	@FLASK="$(FLASK)" scripts/ensure-embedded-default.sh
	@echo "serving on http://$(HOST):$(PORT)/api/v1/  (Ctrl-C stops)"
	@# One process (with threads): the embedded test driver keeps its domains per process.
	@$(BIN)/gunicorn -c deploy/gunicorn.conf.py --workers 1 --threads 4 --bind $(HOST):$(PORT) wsgi:app

# cloud-init is there for its parsers only: disabled first, it never configures this
# machine at boot.
test: venv
	@[ "$$(id -u)" -ne 0 ] || { mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled; }
	@scripts/ensure-packages.sh $(TEST_PACKAGES) && scripts/link-ceph-bindings.sh $(VENV)
	@PG_URL=$$(scripts/ensure-postgres.sh) && scripts/ensure-libvirtd.sh && \
	  VMAPI_TEST_PG_URL="$$PG_URL" $(BIN)/pytest $(WORKERS) $(ORDER) $(DURATIONS) $(PYTEST_ARGS)

# No QEMU guest: PostgreSQL and libvirt's in-process test driver.
test-fast: venv
	@PG_URL=$$(scripts/ensure-postgres.sh) && \
	  VMAPI_TEST_PG_URL="$$PG_URL" $(BIN)/pytest -m "$(FAST_TIERS)" $(WORKERS) $(ORDER) $(PYTEST_ARGS)

lint: venv
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .

format: venv
	@$(BIN)/ruff check --fix .
	@$(BIN)/ruff format .

# BENCH= picks some of: placement stale listing overhead hypervisor memory scaleout streams images boot
# migration calls arrays health filters backups save rbd ha failover
bench: venv
	@scripts/ensure-packages.sh $(BENCH_PACKAGES) && scripts/link-ceph-bindings.sh $(VENV)
	@PG_URL=$$(scripts/ensure-postgres.sh) && scripts/ensure-libvirtd.sh && \
	  VMAPI_TEST_PG_URL="$$PG_URL" $(BIN)/python -m bench $(BENCH)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
