# reconciler — build, local stack, tests.
#
#   make test    (re)install .venv if pyproject.toml changed, binaries if missing (helm: built
#                once with Go), local stack up (PostgreSQL per region + Kafka), the whole
#                test suite, stack down.
#   make demo    same set-up, then the regional-failover demo and its flash-sale second act, stack down.
#   make unit    unit tests only, no stack.          make lint   ruff + mypy.
#   make bench   same set-up, then every benchmarks/bench_*.py, stack down; bench_peers.py
#                (reconciler against Debezium and logical replication) at PEERS_EVENTS.
#   make stack-up / stack-down / stack-status        keep a stack running while you work.
#
# Recipes run with /bin/sh (dash on Debian): POSIX shell only, no bashisms.

VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed-pyproject
DEV_DIR   ?= .dev
DEV       := $(VENV)/bin/reconciler dev
# Integration tests find the stack through this (tests/integration/conftest.py).
export RECONCILER_DEV_DIR := $(DEV_DIR)

# helm, for the chart checks in tests/unit/test_helm_chart.py: built from source with
# the Go toolchain through the Go module proxy (no binary download), once per version,
# into a cache outside the checkout that every clone and worktree shares.
HELM_VERSION ?= v3.21.4
HELM_CACHE   ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/reconciler
HELM         := $(HELM_CACHE)/helm-$(HELM_VERSION)/helm
export RECONCILER_HELM := $(HELM)

# The first interpreter >= 3.11 on PATH; evaluated only when the venv must be built.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { command -v $$p; break; }; done)

# apt-get needs root; use sudo when we are not.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends

# $(call with_stack,COMMAND): bring a fresh stack up, run COMMAND, ALWAYS bring the
# stack down, and exit with COMMAND's status (or dev up's, if that failed).
# --fresh/--purge: every run starts from empty databases and topics, as CI does, and
# leaves no data behind (as root the clusters live in /tmp, outside the checkout).
# INT is trapped (not ignored, which children would inherit) so that Ctrl-C stops
# COMMAND but still reaches `dev down`.
with_stack = status=0; trap : INT; \
	if $(DEV) up --dir "$(DEV_DIR)" --fresh --verbose; then $(1) || status=$$?; else status=$$?; fi; \
	$(DEV) down --dir "$(DEV_DIR)" --purge || true; \
	exit $$status

.PHONY: all venv binaries postgres-bin prometheus-bin java-bin peers-bin helm-bin stack-up stack-down stack-status \
	stack-clean test demo unit bench lint

all: test

venv: $(STAMP)

# Reinstall only when pyproject.toml or constraints.txt is newer than the last successful install.
$(STAMP): pyproject.toml constraints.txt
	@if [ ! -x "$(PY)" ]; then \
		if [ -z "$(PYTHON)" ]; then \
			echo "error: need Python >= 3.11 on PATH (apt-get install -y python3 python3-venv)" >&2; exit 1; \
		fi; \
		echo "creating $(VENV) with $(PYTHON)"; \
		"$(PYTHON)" -m venv "$(VENV)"; \
	fi
	@# the distribution was called "reconciler" before; both would claim the package and the command
	@if $(PY) -m pip show -q reconciler >/dev/null 2>&1; then $(PY) -m pip uninstall -y -q reconciler; fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,bench]"
	@touch $@

binaries: postgres-bin prometheus-bin java-bin

# Debian keeps the server tools in /usr/lib/postgresql/N/bin, outside PATH.
postgres-bin:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; else \
		echo "installing the PostgreSQL server (Debian package postgresql)"; \
		$(SUDO) apt-get update && $(APT_INSTALL) postgresql; \
	fi

# promtool checks and unit-tests the alert rules in config/prometheus.
prometheus-bin:
	@if command -v promtool >/dev/null 2>&1; then :; else \
		echo "installing promtool (Debian package prometheus)"; \
		$(SUDO) apt-get update && $(APT_INSTALL) prometheus; \
	fi

# Java runs the Kafka broker; Maven fetches its jars once (pom.xml).
java-bin:
	@if command -v java >/dev/null 2>&1 && command -v mvn >/dev/null 2>&1; then :; else \
		echo "installing Java 17 and Maven (Debian packages)"; \
		$(SUDO) apt-get update && $(APT_INSTALL) openjdk-17-jre-headless maven; \
	fi

# Kafka Connect + Debezium for benchmarks/bench_peers.py (and its test): Maven resolves
# benchmarks/peers/pom.xml once into a cache outside the checkout (again when the pom changes).
peers-bin: venv java-bin
	@$(PY) benchmarks/bench_peers.py --resolve-only

# Without Go (or the proxy) the build is skipped with a warning, and so, loudly, are
# the chart checks; helm's own major version is in the module path (v3 here).
helm-bin:
	@if [ -x "$(HELM)" ]; then :; \
	elif ! command -v go >/dev/null 2>&1; then \
		echo "WARNING: no Go toolchain on PATH, cannot build helm: the Helm chart checks will be SKIPPED" >&2; \
	else \
		echo "building helm $(HELM_VERSION) with the Go toolchain into $(dir $(HELM)) (once; a few minutes of CPU)"; \
		GOBIN="$(dir $(HELM))" go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION) \
		|| echo "WARNING: building helm failed: the Helm chart checks will be SKIPPED" >&2; \
	fi

stack-up: venv binaries
	$(DEV) up --dir "$(DEV_DIR)" --verbose

stack-down: venv
	$(DEV) down --dir "$(DEV_DIR)"

stack-status: venv
	$(DEV) status --dir "$(DEV_DIR)"

# Stop the stack and delete its data; the Kafka jars go too.
stack-clean: venv
	$(DEV) down --dir "$(DEV_DIR)" --purge
	rm -rf "$(DEV_DIR)"

test: venv binaries helm-bin peers-bin
	@$(call with_stack,$(PY) -m pytest tests)

demo: venv binaries
	@$(call with_stack,$(PY) -m reconciler.demo)

# bench_peers.py's size: the issue's is 200000 (about 10 minutes a run on 2 busy cores).
PEERS_EVENTS ?= 20000
PEERS_RUNS   ?= 1

bench: venv binaries peers-bin
	@$(call with_stack,( for f in benchmarks/bench_*.py; do [ -e "$$f" ] || continue; \
		[ "$$f" = benchmarks/bench_peers.py ] && continue; \
		echo "== $$f"; $(PY) "$$f" || exit $$?; done; \
		echo "== benchmarks/bench_peers.py ($(PEERS_EVENTS) events, $(PEERS_RUNS) runs)"; \
		$(PY) benchmarks/bench_peers.py --events $(PEERS_EVENTS) --runs $(PEERS_RUNS) \
			--json-out benchmarks/results/peers.json ))

unit: venv helm-bin
	$(PY) -m pytest tests/unit

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
