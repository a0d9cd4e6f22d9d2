# `make test` on a fresh machine: makes .venv, installs hmlstm_jax[test] into it, runs the suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet -e '.[test]'

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
