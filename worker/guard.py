"""Orphan hygiene inside a forked process: own process group, parent-death signal, parent check.

A worker must never outlive the process that forked it. On Linux the kernel
delivers SIGKILL when the parent dies (PR_SET_PDEATHSIG); everywhere the worker's
main loop also checks the parent pid (at least every 0.5 s) and exits the whole
group when it changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

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


def parent_gone(expected_ppid: int) -> bool:
    """True once the original parent is gone (we were reparented to init or a subreaper).

    The worker's main loop asks at every turn (at least every 0.5 s), so no thread of its
    own is needed; on Linux PR_SET_PDEATHSIG has already killed us by then."""
    return os.getppid() != expected_ppid
