# Quick start (see README): `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test bench examples system-packages clean

setup: $(VENV)/.installed examples

# Debian packages the project needs: musl-gcc to build guests, gdb for the debugger workflow,
# busybox-static, mksh and sash for the conformance test (tests/conformance.py).
system-packages:
	@command -v musl-gcc >/dev/null && command -v gdb >/dev/null && dpkg -s busybox-static mksh sash >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q musl-tools gdb busybox-static mksh sash)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

examples: system-packages
	$(MAKE) -s -C examples
	$(MAKE) -s -C tests/guests

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" ./examples/demo.sh

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m pytest tests/bench/bench_*.py -s -p no:cacheprovider

clean:
	$(MAKE) -s -C examples clean
	$(MAKE) -s -C tests/guests clean
	rm -rf $(VENV)
