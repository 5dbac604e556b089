"""The broker's records: workers (heartbeat table) and sessions (detach table, replay buffer)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Worker:
    ident: bytes
    kind: str  # lobby | spare | session
    spawned_at: float = field(default_factory=time.monotonic)
    pid: int = 0
    create_time: float = 0.0
    ready: bool = False
    state: str = "starting"  # starting | idle | working | waiting | closing
    last_heartbeat: float = field(default_factory=time.monotonic)
    seq: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    session: "Session | None" = None
    stopping: str | None = None  # the stop reason, once a stop began
    ladder: asyncio.Task | None = None  # the one stop ladder run for this worker
    exited: asyncio.Future | None = None
    hello: asyncio.Future | None = None
    exit_status: int | None = None

    def beat(self, now: float, state: str | None = None) -> bool:
        """Any frame is a beat; a new state also restarts the session's activity clock. True if it changed."""
        self.last_heartbeat = now
        if state is None or state == self.state or self.state == "closing":
            return False
        self.state = state
        if self.session is not None:
            self.session.last_active = now  # a detached session's grace clock starts when its turn ends
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

    def attach(self, cid: int, now: float) -> None:
        self.attached.add(cid)
        self.detached_at = None
        self.last_active = now

    def detach(self, cid: int, now: float) -> bool:
        """Remove one connection; True if that left the session with nobody attached (rule 2)."""
        if cid not in self.attached:
            return False
        self.attached.discard(cid)
        if self.attached:
            return False
        self.detached_at = now
        return True

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
