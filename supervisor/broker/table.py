"""The broker's records: a worker (a row of the heartbeat table) and a session (a row of the detach table).

Plain records. Who writes which field: the pool and the broker's frame handlers write a
worker's fields, the stop ladder its `stopping`/`ladder`; supervisor/broker/sessions.py
is the one writer of every session field (attachment, last activity, replay buffer).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from protocol import lifecycle
from protocol.lifecycle import WorkerMeta
from supervisor.ops.journal import Journal, JournalEntry


@dataclass(eq=False)
class Worker:
    ident: bytes
    kind: str  # protocol.lifecycle: lobby | spare | session
    spawned_at: float = field(default_factory=time.monotonic)
    pid: int = 0
    create_time: float = 0.0
    ready: bool = False
    state: str = lifecycle.STARTING  # starting | idle | working | waiting | closing
    last_heartbeat: float = field(default_factory=time.monotonic)
    seq: int = 0  # the last event seq of its session (written by sessions.py)
    meta: WorkerMeta = field(default_factory=dict)  # type: ignore[assignment]
    caps: frozenset[str] = frozenset()  # what it announced in its hello (protocol.lifecycle)
    session: "Session | None" = None
    stopping: str | None = None  # the stop reason, once a stop began
    ladder: asyncio.Task | None = None  # the one stop ladder run for this worker
    exited: asyncio.Future | None = None
    hello: asyncio.Future | None = None
    exit_status: int | None = None
    zygote: int = 0  # pid of the fork server it came from (after a restart: maybe a predecessor's)

    def beat(self, now: float, state: str | None = None) -> bool:
        """Any frame is a beat; True if it carried a new state (a detached session's grace clock restarts)."""
        self.last_heartbeat = now
        if state is None or state == self.state or self.state == lifecycle.CLOSING:
            return False
        self.state = state
        return True


@dataclass(eq=False)
class Session:
    sid: str
    key: str
    worker: Worker
    created_at: float = field(default_factory=time.time)
    attached: set[int] = field(default_factory=set)  # connection ids
    detached_at: float | None = None  # monotonic
    last_active: float = field(default_factory=time.monotonic)
    close_on_disconnect: bool = False
    delivered_seq: int = 0
    replay: deque = field(default_factory=deque)  # (seq, bytes)
    replay_bytes: int = 0
    dropped_upto: int = 0  # highest seq dropped from the replay buffer

    @property
    def state(self) -> str:
        return self.worker.state

    def remember(self, seq: int, data: bytes, max_events: int, max_bytes: int) -> None:
        self.replay.append((seq, data))
        self.replay_bytes += len(data)
        while self.replay and (len(self.replay) > max_events or self.replay_bytes > max_bytes):
            old_seq, old = self.replay.popleft()
            self.replay_bytes -= len(old)
            self.dropped_upto = old_seq

    def since(self, seq: int) -> tuple[list[bytes], bool]:
        """Buffered events after `seq`, and whether some of them were already dropped."""
        return [d for s, d in self.replay if s > seq], self.dropped_upto > seq


class WorkerTable:
    """The heartbeat table's index: live workers by routing id and by pid, mirrored into the journal.

    The journal (pid, create time, process group) is what a new broker reads to clean up
    after a dead one, so a worker is journaled as soon as its pid is known and dropped
    when it is forgotten."""

    def __init__(self, journal: Journal) -> None:
        self.by_ident: dict[bytes, Worker] = {}
        self.by_pid: dict[int, Worker] = {}
        self.journal = journal

    def __len__(self) -> int:
        return len(self.by_ident)

    def __contains__(self, w: Worker) -> bool:
        return self.by_ident.get(w.ident) is w

    def values(self) -> list[Worker]:
        return list(self.by_ident.values())

    def get(self, ident: bytes) -> Worker | None:
        return self.by_ident.get(ident)

    def add(self, w: Worker) -> None:
        self.by_ident[w.ident] = w

    def launched(self, w: Worker, pid: int, create_time: float) -> None:
        w.pid = pid
        w.create_time = create_time
        self.by_pid[pid] = w
        self.journal.add(JournalEntry(pid, create_time, pid, w.kind))  # a worker leads its own group

    def forget(self, w: Worker) -> None:
        self.by_ident.pop(w.ident, None)
        if w.pid:
            self.by_pid.pop(w.pid, None)
            self.journal.remove(w.pid)

    def count(self, kind: str, ready: bool | None = None) -> int:
        return sum(1 for w in self.by_ident.values() if w.kind == kind and not w.stopping
                   and (ready is None or w.ready == ready))

