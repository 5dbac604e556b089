"""A spare's throwaway `session.create`, so the client's create runs in a process that already ran it.

A worker is forked from the fork server: the first time it runs Hermes' create handler,
every page that run writes (reference counts, dicts, caches) is copied first and the
CPU caches are cold: ~10 ms for a handler that takes ~5 ms in a process that ran it
before (Hermes' own gateway, from its second session on). A spare therefore runs the
handler once through Hermes' own `dispatch` with a transport that drops what it is
written, then takes back everything that create made: the `_sessions` entry (removed
before its deferred agent build can find it), the active-session lease, and the
terminal tool's cwd override for its key. No database row exists (Hermes writes it on
the first prompt) and no event reaches the broker.
"""

from __future__ import annotations

import sys
import time

from worker.hermes.preload import server


class _Drop:
    """A transport that keeps nothing: the throwaway session's frames go nowhere."""

    _closed = False

    def write(self, obj: dict) -> bool:
        return True

    def close(self) -> None:
        pass


def warm_create() -> float:
    """Run one `session.create` and undo it; the seconds it took (0.0 when it failed: the real one runs cold)."""
    t0 = time.perf_counter()
    sid = None
    try:
        response = server.dispatch({"jsonrpc": "2.0", "id": "gateway-warmup", "method": "session.create",
                                    "params": {"cols": 80}}, _Drop())
        result = (response or {}).get("result") or {}
        sid = result.get("session_id")
        if not isinstance(sid, str):
            raise RuntimeError(f"no session in the answer: {str(response)[:200]}")
    except Exception as exc:
        print(f"hermes-runtime: warm-up create failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 0.0
    finally:
        if sid is not None:
            forget(sid)
    return time.perf_counter() - t0


def forget(sid: str) -> None:
    """Take back what a create of `sid` left in this process."""
    with server._sessions_lock:
        session = server._sessions.pop(sid, None)
    if session is None:
        return
    try:
        server._release_active_session_slot(session)
    except Exception:
        pass
    try:
        from tools.terminal_tool import clear_task_env_overrides

        clear_task_env_overrides(str(session.get("session_key") or ""))
    except Exception:
        pass
