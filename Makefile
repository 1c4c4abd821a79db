# Quick start (see README): `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo qemu-demo test bench examples system-packages clean

setup: $(VENV)/.installed examples

# Debian packages the project needs: musl-gcc to build guests, gdb for the debugger workflow,
# QEMU (TCG) and gcc-multilib for the QEMU loop and its 32-bit multiboot example guest,
# busybox-static, mksh and sash for the conformance test (tests/conformance.py), elfutils (eu-stack,
# eu-readelf) that the tests read cores with, dietlibc-dev (`diet gcc`) for a dietlibc test guest.
APT_PACKAGES = musl-tools gdb qemu-system-x86 gcc-multilib busybox-static mksh sash elfutils \
	dietlibc-dev

system-packages:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(APT_PACKAGES))

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

examples: system-packages
	$(MAKE) -s -C examples
	$(MAKE) -s -C examples/qemu_guest
	$(MAKE) -s -C tests/guests

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" ./examples/demo.sh

qemu-demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" ./examples/qemu_loop.sh

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m pytest tests/bench/bench_*.py -s -p no:cacheprovider

clean:
	$(MAKE) -s -C examples clean
	$(MAKE) -s -C examples/qemu_guest clean
	$(MAKE) -s -C tests/guests clean
	rm -rf $(VENV)
