# ufs: the two set-up commands of the README.
#   make demo   - set up everything, then run the main job on a default image
#   make test   - set up everything, then run the whole test suite
# Both install what is missing: Debian packages (when root), the virtualenv,
# the Cython build.  Nothing else is needed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
APT_PKGS := fio xfsprogs btrfs-progs fuse3 libfuse3-dev pkg-config util-linux
PY_PKGS  := "Cython>=3.0.10,<3.4" "setuptools>=77" wheel "pluggy>=1.5" "click>=8.1" "PyYAML>=6.0" \
            "pytest>=8" "hypothesis>=6.100" "trio>=0.22" "pyfuse3>=3.2" "ruff>=0.6"
SOURCES  := $(wildcard ufs/iomap/*.pyx ufs/iomap/*.pxd ufs/iomap/include/*.h ufs/fuse/*.pyx ufs/fuse/*.h) setup.py
PYTEST_ARGS ?=

.PHONY: all sysdeps venv build test demo bench clean distclean

all: build

# Debian packages: only as root, only when something is missing.
.sysdeps-stamp:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages (run as root to install):$$missing"; fi; \
	fi
	@touch $@
sysdeps: .sysdeps-stamp

$(VENV)/.stamp: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip >/dev/null 2>&1 || true
	$(PIP) install -q $(PY_PKGS) 2> >(grep -v "is ignored" >&2)
	@touch $@
venv: .sysdeps-stamp $(VENV)/.stamp

# In-place build of the Cython core; the editable install gives the `ufs` script.
.build-stamp: $(VENV)/.stamp $(SOURCES)
	$(PY) setup.py -q build_ext --inplace -j 2
	$(PIP) install -q --no-build-isolation --no-deps -e . >/dev/null
	@touch $@
build: venv .build-stamp

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

demo: build
	$(PY) -m ufs demo

bench: build
	$(PY) benchmarks/run.py

clean:
	rm -rf build .build-stamp ufs/iomap/*.c ufs/iomap/*.so ufs/iomap/*.html
distclean: clean
	rm -rf $(VENV) .sysdeps-stamp
