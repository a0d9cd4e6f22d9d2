# On a fresh machine: `make demo` trains the demo HM-LSTM, `make test` runs the test suite,
# `make device-report` measures speed on whatever device JAX finds (docs/device/), `make docs`
# builds the README and docs/ into a static site (build/site, MkDocs, strict about links).
# Each makes .venv (Python 3.11) and installs hmlstm_jax with the extras it needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test test-fast demo docs benchmark device-report install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet -e '.[test]'

test: install
	$(PY) -m pytest -q -n auto --durations=25 tests

test-fast: install   # while working: the library's tests, not the ones that start binaries
	$(PY) -m pytest -q -n auto -m "not slow" tests

demo: $(PY)
	$(PY) -m pip install --quiet -e '.[plot]'
	$(PY) -m experiments.charlm --flagfile=demo.flags

docs: $(PY)
	$(PY) -m pip install --quiet -e '.[docs]'
	$(PY) docs/build_site.py --out build/site

benchmark: $(PY)
	$(PY) -m pip install --quiet -e .
	$(PY) -m experiments.benchmark

device-report: $(PY)
	$(PY) -m pip install --quiet -e .
	$(PY) -m experiments.device_report

clean:
	rm -rf $(VENV) build *.egg-info workdirs
