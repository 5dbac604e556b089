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
"""

from __future__ import annotations

import gc
import sys
import time

from worker.hermes_preload import server

REHEARSAL_SID = "gateway-rehearsal"
REHEARSAL_KEY = "gateway-rehearsal"


def rehearse() -> float:
    """Build and drop one agent; returns the seconds it took (0 when it failed: the session builds cold)."""
    t0 = time.perf_counter()
    try:
        tokens = server._set_session_context(REHEARSAL_KEY)
        try:
            agent = server._make_agent(REHEARSAL_SID, REHEARSAL_KEY)
        finally:
            server._clear_session_context(tokens)
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
        return 0.0
    return time.perf_counter() - t0
