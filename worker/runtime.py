"""The interface worker/main.py drives: one runtime per worker process (builtin session, lobby, or hermes)."""

from __future__ import annotations

from typing import Callable, Protocol

from protocol.lifecycle import WorkerMeta
from worker.channel import Call


class Runtime(Protocol):
    state: str  # protocol.lifecycle: idle | working | waiting; sent with every heartbeat
    meta_dirty: bool  # meta() changed since the last heartbeat; main.py clears it when it sends
    on_state: Callable[[], None]  # set by main.py: call on a state change, and a heartbeat goes at once
    sid: str | None  # the bound session's runtime id (None: not bound, or the lobby)
    key: str | None
    dispatches_off_main: bool  # handle() only queues to a thread of its own (else main.py runs a CallRunner)
    caps: frozenset[str]  # announced in the hello (protocol.lifecycle capabilities)

    def handle(self, call: Call) -> None:
        """Answer one call (through call.reply / call.fail), now or later from another thread."""

    def meta(self) -> WorkerMeta: ...

    def tick(self) -> None:
        """Called from the main loop between frames (deadlines)."""

    def record_end(self, key: str, reason: str, at: float) -> None:
        """The lobby's job: a session's worker died without finalizing; record why. Others ignore it."""

    def finalize(self, reason: str) -> None:
        """Flush and close before the process exits (within worker.budget)."""
