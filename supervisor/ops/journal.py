"""The journal of live workers: survives the broker, so a new broker can kill what an old one left.

A JSON file under the data dir, rewritten atomically at most once per reaper tick
(`flush`) when something changed; it holds at most max_workers rows. A row is trusted only when the pid's
process create time still matches: a reused pid is never killed.

The file is not trusted either (another user may have planted it, or a link in its
place): it is written through a fresh temp file (O_EXCL|O_NOFOLLOW, 0600) renamed over
it, a file we do not own is not read, and a row is acted on only for a process of our
uid, with the recorded create time, carrying this gateway's marker (protocol/marker.py).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from dataclasses import asdict, dataclass

import psutil

from protocol.marker import MARKER_ENV, worker_tag
from supervisor import log


@dataclass(slots=True)
class JournalEntry:
    pid: int
    create_time: float
    pgid: int
    kind: str
    session: str = ""
    marker: str = ""  # what the process's MARKER_ENV must be; set by load(), never read from the file


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path
        self.marker = worker_tag(os.path.dirname(path))
        self.entries: dict[int, JournalEntry] = {}
        self.dirty = False
        self._failing = False

    def load(self) -> list[JournalEntry]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return []
        with os.fdopen(fd) as fh:
            owner = os.fstat(fd).st_uid
            if owner != os.getuid():
                log.warning("ignored a worker journal owned by someone else", path=self.path, uid=owner)
                return []
            try:
                rows = json.load(fh)
                fields = set(JournalEntry.__slots__) - {"marker"}
                return [JournalEntry(**{k: v for k, v in row.items() if k in fields}, marker=self.marker)
                        for row in rows if isinstance(row, dict)]
            except (OSError, ValueError, TypeError):
                return []

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        # a fresh name, created here and now: a planted file or link at a fixed .tmp name is never followed
        tmp = f"{self.path}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump([{k: v for k, v in asdict(e).items() if k != "marker"} for e in self.entries.values()], fh)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

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
    """The recorded process, if it provably still is one of ours: same start time, uid and marker."""
    try:
        proc = psutil.Process(entry.pid)
        if abs(proc.create_time() - entry.create_time) > 0.01:
            return None  # the pid was reused by an unrelated process
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc if is_ours(proc, entry.marker) else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_ours(proc: psutil.Process, marker: str) -> bool:
    """Our uid and this gateway's marker in its environment: a worker, the zygote, or what a worker ran."""
    if not marker:
        return False
    try:
        return proc.uids().real == os.getuid() and proc.environ().get(MARKER_ENV) == marker
    except (psutil.Error, OSError):
        return False


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
            members = (orphaned_members(entry) if entry.kind != "zygote" and entry.pgid == entry.pid
                       and not psutil.pid_exists(entry.pid) else [])
            if members:
                # the worker died with the zygote, but what it started lives on in its group: those, one by one
                for member in members:
                    try:
                        member.kill()
                    except psutil.Error:
                        pass
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
                    and os.getpgid(proc.pid) == entry.pgid and proc.status() != psutil.STATUS_ZOMBIE
                    and is_ours(proc, entry.marker)):
                members.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return members

