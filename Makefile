# Two commands for a newcomer: `make run` and `make test`. Both build .venv from pyproject.toml: `run`
# with what running needs (the package and its runtime dependencies; the demo is part of the package),
# `test` with the test extras on top. One stamp each, so either order works.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
SYSCTL := /proc/sys/net/ipv4/tcp_migrate_req

.PHONY: run test lint bench clean debian-packages

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# `ip` brings up loopback in the tests' private network namespaces; `systemd-analyze` checks the unit;
# `systemd-nspawn` boots a real systemd to run the unit under (tests/nspawn.py: the host's root through
# a throwaway overlay; systemd 254 is unpacked there from bookworm-backports, never installed);
# nginx is what the benchmark compares with (RUNLEVEL=1: the package must not start a service on the host);
# Debian's python3 runs an unprivileged supervisord in the tests (the venv's interpreter may sit under /root),
# and in the container it makes the unit's venv (python3-venv).
# podman builds and runs the container image (runc: crun refuses hybrid cgroups; netavark: its network
# backend), mmdebstrap makes the image's base from Debian's packages when no registry is reachable.
debian-packages:
	@missing=""; command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	 command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	 command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	 [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	 [ -x /usr/bin/python3 ] || missing="$$missing python3"; \
	 /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	 containers=""; command -v podman >/dev/null 2>&1 || containers="$$containers podman"; \
	 command -v runc >/dev/null 2>&1 || containers="$$containers runc"; \
	 [ -x /usr/lib/podman/netavark ] || containers="$$containers netavark"; \
	 command -v mmdebstrap >/dev/null 2>&1 || containers="$$containers mmdebstrap"; \
	 if [ -n "$$missing$$containers" ]; then apt-get update -qq; fi; \
	 if [ -n "$$missing" ]; then \
	   RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	 if [ -n "$$containers" ]; then \
	   RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$containers; fi

# config/example.yaml says `migrate: prefer`: supervisord sets the sysctl where it can (root), and
# otherwise reloads by draining the old listeners. Say which before it starts.
run: $(RUN_STAMP)
	@if [ ! -e $(SYSCTL) ]; then \
	   echo "make run: this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14+): reloads drain the old listeners instead"; \
	 elif [ "$$(cat $(SYSCTL))" = 1 ]; then \
	   echo "make run: net.ipv4.tcp_migrate_req is already 1 in this network namespace: reloads migrate queued connections"; \
	 elif [ "$$(id -u)" = 0 ]; then \
	   echo "make run: supervisord will set net.ipv4.tcp_migrate_req=1 in this network namespace (the host's, outside a container); it stays 1 after it exits (sysctl -w net.ipv4.tcp_migrate_req=0 undoes it)"; \
	 else \
	   echo "make run: not root, so net.ipv4.tcp_migrate_req stays 0: reloads drain the old listeners instead of migrating their queues (migrate: prefer)"; \
	 fi
	PATH=$(abspath $(BIN)):$$PATH exec $(BIN)/supervisord -c config/example.yaml

lint: $(TEST_STAMP)
	$(BIN)/ruff check supervisor tests bench
	$(BIN)/mypy

test: $(TEST_STAMP) debian-packages lint
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest tests $(PYTEST_ARGS)

bench: $(TEST_STAMP) debian-packages
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
