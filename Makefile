# Two commands for a newcomer: `make run` and `make test`. Both build .venv from pyproject.toml.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: run test lint bench clean debian-packages

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# `ip` brings up loopback in the tests' private network namespaces; `systemd-analyze` checks the unit;
# `systemd-nspawn` boots a real systemd to run the unit under (tests/nspawn.py: the host's root through
# a throwaway overlay; systemd 254 is unpacked there from bookworm-backports, never installed);
# nginx is what the benchmark compares with (RUNLEVEL=1: the package must not start a service on the host);
# Debian's python3 runs an unprivileged supervisord in the tests (the venv's interpreter may sit under /root),
# and in the container it makes the unit's venv (python3-venv).
debian-packages:
	@missing=""; command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	 command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	 command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	 [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	 [ -x /usr/bin/python3 ] || missing="$$missing python3"; \
	 /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	 if [ -n "$$missing" ]; then apt-get update -qq && \
	   RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

run: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH exec $(BIN)/supervisord -c config/example.yaml

lint: $(STAMP)
	$(BIN)/ruff check supervisor tests bench
	$(BIN)/mypy

test: $(STAMP) debian-packages lint
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest tests $(PYTEST_ARGS)

bench: $(STAMP) debian-packages
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
