"""The [MEMORY] log line: at start, every --monitor-interval, and at stop.

It reports the broker's *current* RSS (not ru_maxrss, the peak, which never goes
down and so cannot show that memory was given back), and the worker table counts.
"""

from __future__ import annotations

import asyncio
import os
import time
import psutil

from supervisor import log
from supervisor.ops.port import Supervised


class Monitor:
    def __init__(self, gateway: Supervised) -> None:
        self.gateway = gateway
        self.me = psutil.Process(os.getpid())
        self.lines = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def fields(self) -> dict[str, str | int]:
        try:
            with self.me.oneshot():
                rss, threads = self.me.memory_info().rss, self.me.num_threads()
                fds = self.me.num_fds() if hasattr(self.me, "num_fds") else 0
        except psutil.Error:
            rss = threads = fds = 0
        counts = self.gateway.counts()
        return {"rss": f"{rss / 1e6:.1f}MB", "threads": threads, "fds": fds, "workers": counts["workers"],
                "attached": counts["attached"], "detached": counts["detached"],
                "uptime": f"{int(time.time() - self.gateway.started_at)}s"}

    def emit(self, when: str = "") -> None:
        self.lines += 1
        log.info("[MEMORY]", **self.fields(), **({"at": when} if when else {}))

    def start(self) -> None:
        self.emit("start")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="monitor")

    def on_reload(self, changed: dict) -> None:
        if "monitor_interval" in changed:
            self._wake.set()  # re-arm with the new interval now, not after the old one ran out

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.gateway.cfg.monitor_interval)
                self._wake.clear()
                continue
            except asyncio.TimeoutError:
                pass
            self.emit()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.emit("stop")
