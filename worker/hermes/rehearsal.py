"""A spare's rehearsal: build one throwaway agent before the spare is handed a session.

A worker forked from the fork server builds its session's agent in a process that
never ran that code: copy-on-write faults over the pages the build touches, cold
per-process state (providers, tool schemas, prompt pieces), all on the clock between
session.create and session.info. A spare rehearses instead: it builds an agent
exactly as Hermes' `_start_agent_build` does (`_make_agent`) for a throwaway
session id and key, and drops it. Nothing of it is kept, so the session that comes
later still gets its own agent, built for its key, cwd and config; only the pages
and caches are warm. No database row is written (Hermes defers that to the first
turn) and no event goes out (the session id is unknown to `_sessions`).

The rehearsal also records the endpoint probes its build made, for the session's
build to start them early (worker/hermes/probe.py); leaves a stock of fresh TLS
contexts, as many as its build asked for (a model request's client shares one context per
bundle instead, worker/hermes/tls_context.py; worker/hermes/ssl_stock.py); and fills the per-process memo of the OpenAI client's
platform headers (`platform.platform()`, `uname -p`, /etc/os-release) that a first
request would otherwise fill.
"""

from __future__ import annotations

import gc
import sys
import time

from worker.hermes import probe, ssl_stock
from worker.hermes.preload import server

# seconds a new spare waits before rehearsing: meanwhile the session whose start forked it builds and runs its
# first turn (worker/hermes/runtime.py)
REHEARSAL_DELAY = 0.5
REHEARSAL_SID = "gateway-rehearsal"
REHEARSAL_KEY = "gateway-rehearsal"


def rehearse() -> float:
    """Build and drop one agent; returns the seconds it took (0 when it failed: the session builds cold)."""
    t0 = time.perf_counter()
    ssl_stock.install()
    ssl_stock.forget()
    probe.install()
    probe.record(True)
    try:
        tokens = server._set_session_context(REHEARSAL_KEY)
        try:
            agent = server._make_agent(REHEARSAL_SID, REHEARSAL_KEY)
        finally:
            server._clear_session_context(tokens)
            probe.record(False)
        close = getattr(agent, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                pass
        del agent
        gc.collect()
    except Exception as exc:  # a warm-up only
        print(f"hermes-runtime: rehearsal failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        probe.record(False)
        return 0.0
    _warm_request_path()
    stocked = ssl_stock.stock_asked()
    print(f"hermes-runtime: spare stocked {stocked} TLS contexts", file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def _warm_request_path() -> None:
    """Per-process memos a first model request fills, filled here without any request."""
    try:
        import openai
        from openai import _base_client

        _base_client.platform_headers(openai.__version__, platform=None)
    except Exception:
        pass
