"""What a worker changes in Hermes' process-level behaviour: it owns one session, and its process group is the
session's (the broker reclaims a session by killing that group).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

from worker.hermes import slash_fork
from worker.hermes.preload import server

PR_SET_CHILD_SUBREAPER = 36
_EagerSlashWorker = server._SlashWorker  # Hermes' own: a subprocess started at construction


def no_update_check() -> None:
    """The update check is not run (see _SKIPPED_THREADS): say it is done, with no result, so session.info
    does not wait 0.5 s for it (twice per session) — the TUI then shows no update badge."""
    try:
        from hermes_cli import banner

        banner._update_check_done.set()
    except (ImportError, AttributeError):
        pass


def become_subreaper() -> None:
    """Orphans of this worker's children (a tool's double-forked daemon) are re-parented here, so the
    final sweep can find them."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass


class GroupedSubprocess:
    """`subprocess` as Hermes' server module sees it in a worker: the slash worker stays in our group.

    Hermes starts its slash-worker subprocess in a new session (so a stray killpg in
    the TUI cannot take the TUI down). Here the worker is the group leader and the
    broker reclaims a session by killing that group, so the child must stay in it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (the stdlib's name)
        argv = args[0] if args else kwargs.get("args")
        if slash_fork.wants_fork(argv, kwargs):  # forked from the preloaded fork server (worker/hermes/slash_fork.py)
            try:
                return slash_fork.ForkedSlash(list(argv), env=kwargs.get("env"), cwd=kwargs.get("cwd"))
            except OSError as exc:
                print(f"hermes-runtime: forking the slash worker failed, starting it: {exc}", file=sys.stderr,
                      flush=True)
        kwargs["start_new_session"] = False
        return subprocess.Popen(*args, **kwargs)


class LazySlashWorker:
    """Hermes' slash worker, started by the session's first slash command instead of with the session.

    Hermes starts `python -m tui_gateway.slash_worker` (a fresh interpreter that imports
    Hermes: ~37 MiB USS, ~0.3 s of CPU) for every session it creates or resumes, in
    one shared process; here every session already is a process of its own, and most
    never send a `slash.exec` (the TUI handles most commands itself). The first one
    pays the start, as it would in Hermes when it follows session.create closely.
    Hermes only calls run() and close() on it.

    One running slash worker per (key, model, home) in this process, whichever instance
    started it: a `slash.exec` that arrives before the agent build finished makes Hermes
    start one, and the build then attaches another without closing the first (Hermes'
    race; a leaked subprocess there, a second slash worker here until the session ends)."""

    _running: dict[tuple, Any] = {}
    _lock = threading.Lock()

    def __init__(self, session_key: str, model: str, profile_home: str | None = None) -> None:
        self._args = (session_key, model, profile_home)
        self._closed = False

    def run(self, command: str) -> str:
        with self._lock:
            if self._closed:
                raise RuntimeError("slash worker closed")
            worker = self._running.get(self._args)
            if worker is None:
                key, model, home = self._args
                worker = self._running[self._args] = _EagerSlashWorker(key, model, profile_home=home)
        return worker.run(command)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            worker = self._running.pop(self._args, None)
        if worker is not None:
            worker.close()


def kill_descendants() -> None:
    """Everything this worker started, including children that left our group (tools start theirs in
    new sessions): kill their groups and them. The broker's group kill is the backstop."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:
        return
    own = os.getpgid(0)
    for child in children:
        try:
            pgid = os.getpgid(child.pid)
            if pgid != own:
                os.killpg(pgid, signal.SIGKILL)
            child.kill()
        except (OSError, Exception):
            pass
