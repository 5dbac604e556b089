"""The stop ladder: ask -> SIGTERM the group -> SIGKILL the group -> reaped, one coroutine per stop.

A stop is marked at once (`Worker.stopping`), so no call can re-attach a stopping
worker, and runs once however many callers ask for it. The worker is told
`stop_timeout` when it starts and keeps its own waits within 60% of it
(worker/budget.py); it takes the SIGTERM at half-time as "stop now", so only a
worker that is stuck meets the SIGKILL.
One log line per stop, whatever the path. The end of a session whose worker could
not finalize (killed, crashed) is noted to the lobby, which records it in the store.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter, deque
from typing import Callable

from protocol import frames, lifecycle
from supervisor import log
from supervisor.broker.launcher import Launcher
from supervisor.broker.link import WorkerLink
from supervisor.broker.table import Worker
from supervisor.hooks import Hooks

GONE_WAIT = 2.0  # s to wait for the exit report after SIGKILL before the worker is written off


class StopLadder:
    def __init__(self, stop_timeout: Callable[[], float], link: WorkerLink, launcher: Launcher,
                 gone: Callable[[Worker, int | None], None], reaps: Counter[str]) -> None:
        self.stop_timeout = stop_timeout
        self.link = link
        self.launcher = launcher
        self.gone = gone  # the broker's cleanup, for a worker whose exit was never reported
        self.on_stopped: Hooks[[str, float]] = Hooks("on_worker_stopped")  # (reason, ladder seconds)
        self.reaps = reaps  # stops by reason (hermes-ps --stats, metrics)
        self._tasks: set[asyncio.Task] = set()

    def begin(self, w: Worker, reason: str) -> asyncio.Task:
        """Mark the worker stopping now and run its ladder once; the task ends when it is reaped."""
        if w.ladder is None:
            w.stopping = reason
            w.state = lifecycle.CLOSING
            task = asyncio.get_running_loop().create_task(self._run(w, reason))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            w.ladder = task
        return w.ladder

    async def stop(self, w: Worker, reason: str) -> None:
        await asyncio.shield(self.begin(w, reason))

    async def _run(self, w: Worker, reason: str) -> None:
        s = w.session
        detached_for = round(time.monotonic() - s.detached_at, 3) if s and s.detached_at else 0.0
        t0 = time.monotonic()
        budget = self.stop_timeout()
        step = "ask"
        assert w.exited is not None
        if not w.ready and s is None:
            # a spare or lobby still starting (a hermes one preloads for seconds): it holds nothing yet and cannot
            # hear a stop before its hello, so waiting for it only held a shutdown for the whole budget
            step = "kill"
            if w.pid:
                self.launcher.signal(w.pid, signal.SIGKILL)
            else:
                self.gone(w, None)  # never forked: a fork reported later is killed (Pool.on_launched)
        elif w.pid == 0 and not w.ready:
            # not forked yet (or fork failed): wait briefly for the pid before escalating
            try:
                await asyncio.wait_for(asyncio.shield(w.hello), budget / 2)
            except (asyncio.TimeoutError, RuntimeError):
                pass
        if step == "kill":
            pass
        elif reason == lifecycle.Reason.HEARTBEAT_LOST:
            step = "kill"
            self.launcher.signal(w.pid, signal.SIGKILL)
        elif not self.link.send(w, frames.pack(frames.STOP, reason=reason)):
            step = "term"  # not connected yet (or gone): nobody to ask, and nothing unflushed
            self.launcher.signal(w.pid, signal.SIGTERM)
        for sig, at in ((signal.SIGTERM, budget / 2), (signal.SIGKILL, budget)):
            if w.exited.done() or step == "kill":
                break
            try:
                await asyncio.wait_for(asyncio.shield(w.exited), max(0.0, t0 + at - time.monotonic()))
                break
            except asyncio.TimeoutError:
                step = "term" if sig == signal.SIGTERM else "kill"
                self.launcher.signal(w.pid, sig)
        try:
            await asyncio.wait_for(asyncio.shield(w.exited), GONE_WAIT)
        except asyncio.TimeoutError:
            log.error("worker did not exit after SIGKILL", pid=w.pid)
            self.gone(w, None)
        took = round(time.monotonic() - t0, 3)
        self.reaps[reason] += 1
        log.info("worker stopped", session=s.sid if s else "", key=s.key if s else "", pid=w.pid, kind=w.kind,
                 reason=reason, detached_for=detached_for, ladder=step, took=took)
        self.on_stopped.run(reason, took)


class EndNotes:
    """`ended` frames for the lobby: why a session ended, for a worker that could not say so itself.

    Sent for every session whose worker is gone: the lobby writes only a row that no finalize
    ended and no later resume re-opened, so a clean stop costs one no-op update. Kept (bounded)
    while there is no lobby to take them, and sent when the next one says hello."""

    def __init__(self, link: WorkerLink, lobby: Callable[[], Worker | None]) -> None:
        self.link = link
        self.lobby = lobby
        self.waiting: deque[bytes] = deque(maxlen=10_000)

    def note(self, key: str, reason: str) -> None:
        data = frames.pack(frames.ENDED, key=key, reason=reason, at=time.time())
        lobby = self.lobby()
        if lobby is not None and lobby.ready and not lobby.stopping and not self.waiting \
                and self.link.send(lobby, data):
            return
        self.waiting.append(data)

    def flush(self, lobby: Worker) -> None:
        """A lobby said hello: hand it what waited."""
        while self.waiting and self.link.send(lobby, self.waiting[0]):
            self.waiting.popleft()
