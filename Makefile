# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: run test chaos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hermes-gateway run

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

chaos: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow tests/chaos

bench: $(STAMP)
	$(PY) bench/latency.py

clean:
	rm -rf $(VENV) build *.egg-info
