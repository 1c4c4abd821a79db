# Quick start (see README): `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test bench examples system-packages clean

setup: $(VENV)/.installed examples

# Debian packages the project needs: musl-gcc to build guests, gdb for the debugger workflow,
# elfutils (eu-stack, eu-readelf) that the tests read cores with.
system-packages:
	@command -v musl-gcc >/dev/null && command -v gdb >/dev/null && command -v eu-stack >/dev/null || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q musl-tools gdb elfutils)

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
