# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test

.PHONY: run test tmux chromium chaos bench clean tui

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# the hermes extra (hermes-agent 0.19.0: the `hermes` runtime and the Node TUI bundled in its wheel), on first use
HSTAMP := $(VENV)/.installed-hermes
$(HSTAMP): $(STAMP) pyproject.toml
	$(PY) -c 'import importlib.metadata as m; assert m.version("hermes-agent") == "0.19.0"' 2>/dev/null || \
	  $(PY) -m pip install -q -e '.[hermes]'
	touch $(HSTAMP)

run: $(STAMP)
	$(VENV)/bin/hermes-gateway run

# tests also need the `hermes` extra (the hermes runtime, and the real Node TUI bundled in its wheel) and tmux
# (when pip cannot get it, say so and go on: those tests skip with the reason; the next run tries again)
$(TSTAMP): $(STAMP) pyproject.toml
	@if $(PY) -m pip install -q -e '.[test,hermes]'; then touch $(TSTAMP); \
	else echo "note: could not install the hermes extra: the hermes runtime and TUI tests will skip"; fi

# a Debian package a test needs, installed as root with apt-get (after one `apt-get update` if the first try
# fails); otherwise a note, and the tests that need it skip with the reason: $(call apt_tool,COMMAND,WHO NEEDS IT)
apt_tool = @command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q $(1) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	      apt-get install -y -q $(1) >/dev/null 2>&1; } || echo "note: apt-get could not install $(1): $(2) will skip"; \
	  else echo "note: $(1) is missing and we are not root: $(2) will skip"; fi; }

tmux:
	$(call apt_tool,tmux,the TUI tests)

# the dashboard's browser test drives Debian's chromium (Playwright never downloads a browser here)
chromium:
	$(call apt_tool,chromium,the browser test)

# two test processes (pytest-xdist; one on a 1-core machine): most tests wait on real processes and sockets,
# so the suite takes ~3.5 min instead of ~6 on 2 cores; every test has its own dirs, ports and process groups
test: $(TSTAMP) tmux chromium
	$(PY) -m pytest -q -rs -p no:cacheprovider -n auto --maxprocesses=2

# the long chaos variants (~10 min); the summary table prints at the end (CHAOS_TABLE=path also writes it there)
chaos: $(TSTAMP)
	$(PY) -m pytest -q -rs -p no:cacheprovider -m slow tests/chaos

bench: $(STAMP)
	$(PY) bench/latency.py

# the real Hermes TUI (a Node program bundled in the hermes-agent wheel) against the gateway `make run` started;
# the first use installs the hermes extra. TUI_ARGS go to `hermes-gateway tui` (e.g. TUI_ARGS='--resume KEY')
# (node is checked first, so a machine without it installs nothing)
TUI_ARGS ?=
.PHONY: tui-node
tui-node:
	@command -v node >/dev/null 2>&1 || { echo "make tui: node is required (the Hermes TUI is a Node program, Node >= 20.19):" \
	  "install Node.js (apt-get install nodejs, brew install node) and run make tui again" >&2; exit 1; }

tui: tui-node $(HSTAMP)
	$(VENV)/bin/hermes-gateway tui $(TUI_ARGS)

# issue 8: A = Hermes' own gateway, B = --runtime hermes, C = builtin + openai agent, same workload, ~10 min;
# needs the `hermes` extra; writes bench/compare_hermes.json and its section of docs/performance.md, plots included

# with the `bench` extra (matplotlib) for its plots, docs/compare-*.png
BSTAMP := $(VENV)/.installed-bench
$(BSTAMP): $(STAMP) pyproject.toml
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	touch $(BSTAMP)

.PHONY: bench-compare
bench-compare: $(HSTAMP) $(BSTAMP)
	$(PY) bench/compare_hermes.py --json bench/compare_hermes.json > /dev/null

clean:
	rm -rf $(VENV) build *.egg-info
