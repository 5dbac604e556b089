"""Background turns (prompt.background) on a small fixed pool with a bounded queue.

One thread per request let a client start a thousand agent turns (a thousand provider
requests) in one session. A few threads take the turns in order; a request that finds
the queue full is refused at once with an error that names the limit, and nothing
already queued or running is affected.
"""

from __future__ import annotations

import queue
import threading
import traceback
from typing import Callable

from protocol.jsonrpc import LIMIT_REACHED, RpcError

DEFAULT_WORKERS = 2
DEFAULT_QUEUE = 8


class BackgroundPool:
    def __init__(self, workers: int = DEFAULT_WORKERS, depth: int = DEFAULT_QUEUE) -> None:
        self.workers = max(1, int(workers))
        self.depth = max(0, int(depth))
        # the queue holds what waits; `workers` more run: a slot is taken at submit, freed when a job ends
        self._slots = threading.BoundedSemaphore(self.workers + self.depth)
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"background-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`, or raise RpcError(LIMIT_REACHED) naming the limit when every slot is taken."""
        if not self._slots.acquire(blocking=False):
            raise RpcError(LIMIT_REACHED,
                           f"background limit reached: {self.workers} running and {self.depth} queued per session"
                           " (--background-workers, --background-queue); wait for a background.complete",
                           {"limit": "background_queue", "running": self.workers, "queued": self.depth})
        self._jobs.put(job)

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # a job's bug must not take a pool thread with it
                traceback.print_exc()
            finally:
                self._slots.release()
