"""Per-worker process figures (CPU%, RSS, USS, threads, fds, children), read off the event loop.

psutil reads /proc files; for hundreds of workers that is real work, so it runs in
one dedicated thread. A background pass every few seconds keeps CPU% meaningful
(psutil's cpu_percent is a delta between two calls, primed once per worker) and
the memory sums fresh for /metrics; `control list` asks for a fresh pass of the
cheap figures on demand.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import psutil

from supervisor import log

INTERVAL = 2.0  # seconds between background passes (stretched if a pass is slow)


@dataclass(slots=True)
class Figures:
    cpu: float = 0.0  # percent of one core since the previous background pass
    rss: int = 0
    uss: int = 0
    threads: int = 0
    fds: int = 0
    children: int = 0
    at: float = 0.0  # time.time() of the reading

    def to_dict(self) -> dict:
        return asdict(self)


class Sampler:
    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.figures: dict[int, Figures] = {}  # pid -> latest; written by the sampler thread only
        self.passes = 0
        self._procs: dict[int, psutil.Process] = {}  # only touched in the sampler thread
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ops-sampler")
        self._task: asyncio.Task | None = None

    def start(self, targets) -> None:
        """`targets()` -> [(pid, create_time)]; called in the loop, so it may read the broker's tables."""
        self._task = asyncio.get_running_loop().create_task(self._loop(targets), name="ops-sampler")

    async def _loop(self, targets) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self.sample(targets(), cpu=True)
            except Exception as exc:  # never let a /proc oddity end the sampling
                log.warning("worker sampling failed", error=repr(exc))
            took = time.monotonic() - t0
            await asyncio.sleep(max(self.interval, 10 * took))  # at most ~10% of a core

    async def sample(self, pids: list[tuple[int, float]], cpu: bool = False) -> None:
        """Refresh the figures of `pids` in the sampler thread; with cpu=True also CPU% (background pass)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._sample, pids, cpu)

    def _sample(self, pids: list[tuple[int, float]], cpu: bool) -> None:
        kids = _children_map()
        now = time.time()
        for pid, create_time in pids:
            proc = self._procs.get(pid)
            try:
                if proc is None or (create_time and abs(proc.create_time() - create_time) > 0.01):
                    proc = self._procs[pid] = psutil.Process(pid)
                    proc.cpu_percent(None)  # prime: the first call has no interval to measure
                old = self.figures.get(pid)
                with proc.oneshot():
                    fig = Figures(
                        cpu=round(proc.cpu_percent(None), 1) if cpu else (old.cpu if old else 0.0),
                        threads=proc.num_threads(),
                        fds=_num_fds(proc),
                        children=_descendants(pid, kids),
                        at=now,
                    )
                    try:
                        full = proc.memory_full_info()
                        fig.rss, fig.uss = full.rss, getattr(full, "uss", 0)
                    except psutil.AccessDenied:
                        fig.rss = proc.memory_info().rss
                self.figures[pid] = fig
            except psutil.Error:
                self._procs.pop(pid, None)
                self.figures.pop(pid, None)
        if cpu:  # the background pass sees every worker: forget the ones that are gone
            live = {pid for pid, _ in pids}
            for pid in [p for p in self._procs if p not in live]:
                del self._procs[pid]
            for pid in [p for p in self.figures if p not in live]:
                self.figures.pop(pid, None)
            self.passes += 1

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _num_fds(proc: psutil.Process) -> int:
    try:
        return proc.num_fds()
    except (AttributeError, psutil.AccessDenied):
        return 0


def _children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for the whole machine, built once per pass (psutil's children() rescans per call)."""
    out: dict[int, list[int]] = {}
    for p in psutil.process_iter(["ppid"]):
        ppid = p.info.get("ppid")
        if ppid:
            out.setdefault(ppid, []).append(p.pid)
    return out


def _descendants(pid: int, kids: dict[int, list[int]]) -> int:
    n, stack, seen = 0, list(kids.get(pid, ())), set()
    while stack:
        child = stack.pop()
        if child in seen:
            continue
        seen.add(child)
        n += 1
        stack.extend(kids.get(child, ()))
    return n
