"""Orphan hygiene inside a forked process: own process group, parent-death signal, parent watch.

A worker must never outlive the process that forked it. On Linux the kernel
delivers SIGKILL when the parent dies (PR_SET_PDEATHSIG); everywhere a small
daemon thread also polls the parent pid and exits the whole group when it changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


_libc: list = []  # resolved once (in the zygote, before it forks): find_library runs `ldconfig -p`


def _prctl():
    if not _libc:
        try:
            _libc.append(ctypes.CDLL(None, use_errno=True).prctl)
        except (OSError, AttributeError):
            _libc.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl)
    return _libc[0]


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return _prctl()(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_group_leader() -> None:
    """New session and process group, so a group kill takes every child of this worker."""
    try:
        os.setsid()
    except OSError:
        os.setpgid(0, 0)


def exit_group(code: int = 0) -> None:
    """Take everything this process started down with it, then leave at once."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(os.getpgid(0), signal.SIGTERM)
    except OSError:
        pass
    os._exit(code)


def watch_parent(expected_ppid: int, interval: float = 0.2, on_orphan=exit_group) -> threading.Thread:
    """Exit when the original parent is gone (reparented to init or a subreaper)."""

    def run() -> None:
        while True:
            if os.getppid() != expected_ppid:
                on_orphan(0)
                return
            time.sleep(interval)

    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread
