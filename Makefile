# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test

.PHONY: run test tmux chromium chaos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hermes-gateway run

# tests also need the `hermes` extra (the hermes runtime, and the real Node TUI bundled in its wheel) and tmux
# (when pip cannot get it, say so and go on: those tests skip with the reason; the next run tries again)
$(TSTAMP): $(STAMP) pyproject.toml
	@if $(PY) -m pip install -q -e '.[test,hermes]'; then touch $(TSTAMP); \
	else echo "note: could not install the hermes extra: the hermes runtime and TUI tests will skip"; fi

tmux:
	@command -v tmux >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q tmux >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	      apt-get install -y -q tmux >/dev/null 2>&1; } || echo "note: apt-get could not install tmux: the TUI tests will skip"; \
	  else echo "note: tmux is missing and we are not root: the TUI tests will skip"; fi; }

# the dashboard's browser test drives Debian's chromium (Playwright never downloads a browser here)
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	      apt-get install -y -q chromium >/dev/null 2>&1; } || echo "note: apt-get could not install chromium: the browser test will skip"; \
	  else echo "note: chromium is missing and we are not root: the browser test will skip"; fi; }

test: $(TSTAMP) tmux chromium
	$(PY) -m pytest -q -rs -p no:cacheprovider

# the long chaos variants (~10 min); the summary table prints at the end (CHAOS_TABLE=path also writes it there)
chaos: $(TSTAMP)
	$(PY) -m pytest -q -rs -p no:cacheprovider -m slow tests/chaos

bench: $(STAMP)
	$(PY) bench/latency.py

# issue 8: A = Hermes' own gateway, B = --runtime hermes, C = builtin + openai agent, same workload, ~10 min;
# needs only the `hermes` extra; writes bench/compare_hermes.json and its section of docs/performance.md
HSTAMP := $(VENV)/.installed-hermes
$(HSTAMP): $(STAMP) pyproject.toml
	$(PY) -c 'import importlib.metadata as m; assert m.version("hermes-agent") == "0.19.0"' 2>/dev/null || \
	  $(PY) -m pip install -q -e '.[hermes]'
	touch $(HSTAMP)

.PHONY: bench-compare
bench-compare: $(HSTAMP)
	$(PY) bench/compare_hermes.py --json bench/compare_hermes.json > /dev/null

clean:
	rm -rf $(VENV) build *.egg-info
