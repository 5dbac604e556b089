"""The journal of live workers: survives the broker, so a new broker can kill what an old one left.

A JSON file under the data dir, rewritten atomically at most once per reaper tick
(`flush`) when something changed; it holds at most max_workers rows. A row is trusted only when the pid's
process create time still matches: a reused pid is never killed.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass

import psutil

from supervisor import log


@dataclass(slots=True)
class JournalEntry:
    pid: int
    create_time: float
    pgid: int
    kind: str
    session: str = ""


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: dict[int, JournalEntry] = {}
        self.dirty = False
        self._failing = False

    def load(self) -> list[JournalEntry]:
        try:
            with open(self.path) as fh:
                rows = json.load(fh)
            return [JournalEntry(**row) for row in rows if isinstance(row, dict)]
        except (OSError, ValueError, TypeError):
            return []

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as fh:
            json.dump([asdict(e) for e in self.entries.values()], fh)
        os.replace(tmp, self.path)

    def flush(self) -> bool:
        """Write the file if it changed; called once per reaper tick, not on every spawn and exit.

        A failed write (disk full, read-only data dir) is logged and retried on the next
        tick; it never interrupts the broker's bookkeeping.
        """
        if not self.dirty:
            return True
        try:
            self._save()
        except OSError as exc:
            if not self._failing:
                log.error("cannot write the worker journal", path=self.path, error=str(exc))
            self._failing = True
            return False
        self.dirty = self._failing = False
        return True

    def add(self, entry: JournalEntry) -> None:
        self.entries[entry.pid] = entry
        self.dirty = True

    def update(self, pid: int, **changes) -> None:
        entry = self.entries.get(pid)
        if entry is not None:
            for key, value in changes.items():
                setattr(entry, key, value)
            self.dirty = True

    def remove(self, pid: int) -> None:
        if self.entries.pop(pid, None) is not None:
            self.dirty = True

    def clear(self) -> None:
        self.entries.clear()
        self.dirty = True
        self.flush()


def still_running(entry: JournalEntry) -> psutil.Process | None:
    try:
        proc = psutil.Process(entry.pid)
        if abs(proc.create_time() - entry.create_time) > 0.01:
            return None  # the pid was reused by an unrelated process
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def kill_leftovers(entries: list[JournalEntry]) -> list[JournalEntry]:
    """SIGKILL the group of every recorded worker that is still the same process; return those killed.

    Workers first: killing the zygote first would let PDEATHSIG take the workers alone
    and leave what they started. Only a group that the recorded process leads is
    signalled, and never our own (the zygote shares the old broker's group).
    """
    killed = []
    own_group = os.getpgid(0)
    for entry in sorted(entries, key=lambda e: e.kind == "zygote"):
        proc = still_running(entry)
        if proc is None:
            if (entry.kind != "zygote" and entry.pgid == entry.pid and not psutil.pid_exists(entry.pid)
                    and orphaned_members(entry)):
                # the worker died with the zygote, but what it started lives on in its group
                _kill_group(entry.pgid)
                killed.append(entry)
            continue
        try:
            if entry.pgid != entry.pid or entry.pgid == own_group:
                raise ProcessLookupError  # not a group leader: kill the process alone
            os.killpg(entry.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                proc.kill()
            except psutil.Error:
                continue
        killed.append(entry)
    return killed


def orphaned_members(entry: JournalEntry) -> list[psutil.Process]:
    """Live processes still in a dead worker's group, started after the worker (so never a reused pgid)."""
    members = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if (proc.info["create_time"] >= entry.create_time - 0.01 and proc.pid != os.getpid()
                    and os.getpgid(proc.pid) == entry.pgid and proc.status() != psutil.STATUS_ZOMBIE):
                members.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return members


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
