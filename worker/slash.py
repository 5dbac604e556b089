"""The slash worker: one thread, one queue, one command at a time, each with a deadline.

A slow command never blocks prompts (turns run on their own thread). A command
that overruns its deadline is answered with an error; its thread is abandoned and
a fresh one takes the rest of the queue.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from protocol.jsonrpc import SLASH_FAILED
from worker.channel import Call


@dataclass(slots=True)
class SlashJob:
    call: Call
    run: Callable[[], str]
    deadline: float = 0.0
    started: float = field(default=0.0)


class SlashWorker:
    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._queue: queue.SimpleQueue[SlashJob | None] = queue.SimpleQueue()
        self._current: SlashJob | None = None
        self._lock = threading.Lock()
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="slash-worker", daemon=True)
        # owner first, then start: a new thread that took a job before it was the owner would drop it
        self._thread = thread
        thread.start()
        return thread

    def submit(self, call: Call, run: Callable[[], str]) -> None:
        self._queue.put(SlashJob(call, run))

    def _loop(self) -> None:
        me = threading.current_thread()
        while True:
            job = self._queue.get()
            if job is None or self._thread is not me:
                return
            with self._lock:
                job.started = time.monotonic()
                job.deadline = job.started + self.timeout
                self._current = job
            try:
                output = job.run()
                job.call.reply({"output": output})
            except Exception as exc:  # a failing command answers its caller and nothing else
                job.call.fail(SLASH_FAILED, f"slash command failed: {exc}")
            with self._lock:
                if self._current is job:
                    self._current = None
            if self._thread is not me:
                return  # replaced while we were stuck; the new thread owns the queue

    def check_deadline(self) -> None:
        """Called from the worker's main loop: fail an overdue command and replace the stuck thread."""
        with self._lock:
            job = self._current
            if job is None or time.monotonic() < job.deadline:
                return
            self._current = None
            job.call.fail(SLASH_FAILED, f"slash command timed out after {self.timeout:g}s")
            self._thread = self._start()

    def stop(self) -> None:
        self._queue.put(None)
