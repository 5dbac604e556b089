"""Process cleanup shared by the test fixtures and the benchmarks."""

from __future__ import annotations

import os
import signal

import psutil


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL each process's group (a worker leads one) and the process itself; gone ones are skipped."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.kill()
        except psutil.Error:
            pass
