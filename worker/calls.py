"""Run a runtime's call handlers off the main thread, in arrival order.

The main thread owns the broker link and sends the heartbeats. A handler that writes
to the store can wait for SQLite's write lock (busy_timeout, 30 s) while some other
program holds it; on the main thread that wait silenced the heartbeats, and after
liveness x interval the broker killed a healthy worker as hung, losing the call.
Handlers therefore run on one `calls` thread, still one at a time and in order. Calls
that only stop or unblock something (an interrupt) run inline, so they never queue
behind a handler that waits.
"""

from __future__ import annotations

import queue
import threading
import traceback
from typing import Callable

from worker.channel import Call

INLINE = frozenset({"session.interrupt", "approval.respond", "clarify.respond", "sudo.respond", "secret.respond"})


class CallRunner:
    def __init__(self, handle: Callable[[Call], None], after: Callable[[], None] = lambda: None) -> None:
        self.handle = handle
        self.after = after  # run after each handled call (the worker sets its title once a session is bound)
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="calls", daemon=True)
        self._thread.start()

    def call(self, call: Call) -> None:
        """Main thread: hand a call over; an inline one is handled at once."""
        if call.method in INLINE:
            self._run(lambda: self.handle(call))
        else:
            self._queue.put(lambda: self.handle(call))

    def later(self, job: Callable[[], None]) -> None:
        """Any other work that may touch the store, in order with the calls."""
        self._queue.put(job)

    def close(self, timeout: float) -> bool:
        """Let queued work finish (at most `timeout` s); False if it is still running."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._run(job)

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:  # a handler's bug must not end the thread: later calls still get answers
            traceback.print_exc()
        finally:
            self.after()
