"""The broker: the heartbeat table, the detach table, and the reaper tick, wired to the link, pool and ladder.

It knows nothing about agents. It knows which worker owns which session, who is
attached, when each worker last spoke, and the lifecycle rules. Payloads from
workers (`json` in res/ev frames) are forwarded to clients as they are. The rooms:
link.py (the ROUTER and pending calls), pool.py (starting workers, spares, the
handoff), ladder.py (stopping them), sessions.py (the detach table), rules.py (the
decisions), launcher.py (processes).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from typing import Callable

import zmq

from protocol import frames, lifecycle
from protocol.lifecycle import Reason
from supervisor import log
from supervisor.broker.ladder import EndNotes, StopLadder
from supervisor.broker.launcher import LaunchEvents, Launcher, ZygoteLauncher, create_time
from supervisor.broker.link import WorkerLink
from supervisor.broker.memory import release_free_memory
from supervisor.broker.pool import HELLO_TIMEOUT, Pool
from supervisor.broker.rules import Limits, plan_tick
from supervisor.broker.sessions import SessionTable
from supervisor.broker.table import Worker, WorkerTable
from supervisor.config import Config
from supervisor.ops.journal import Journal, JournalEntry
from supervisor.paths import RuntimePaths


class Broker:
    def __init__(self, cfg: Config, paths: RuntimePaths, journal: Journal,
                 launcher: Callable[[LaunchEvents], Launcher] = ZygoteLauncher,
                 ctx: zmq.Context | None = None) -> None:
        """`launcher` builds the launcher from the events it reports; `ctx` is shared with the caller's sockets
        (a test runs a broker in its own process); a broker that made its own context terms it on shutdown."""
        self.cfg = cfg
        self.paths = paths
        self.journal = journal
        self.started = time.time()
        self.accepting = True  # written only by set_accepting
        self.closing = False
        self.store_error: str = ""
        self.reaps: Counter[str] = Counter()
        self.on_change: Callable[[], None] = lambda: None
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context(io_threads=1)
        self.workers = WorkerTable(journal)
        self.launcher = launcher(LaunchEvents(self._on_launched, self._on_failed, self._on_exited,
                                              self._on_launcher_lost))
        self.link = WorkerLink(self.ctx, paths.broker_endpoint, self.workers.get, self._on_frame,
                               lambda: self.cfg.max_worker_queue)
        self.sessions = SessionTable(lambda: self.limits, lambda: self.cfg.replay_events,
                                     lambda: self.cfg.replay_bytes, self.begin_stop)
        self.sessions.on_change = lambda: self.on_change()
        self.ladder = StopLadder(lambda: self.cfg.stop_timeout, self.link, self.launcher, self._worker_gone,
                                 self.reaps)
        self.pool = Pool(cfg, paths.broker_endpoint, self.workers, self.launcher, self.link, self.sessions,
                         self.ladder, lambda: self.accepting)
        self.end_notes = EndNotes(self.link, lambda: self.pool.lobby)
        self.legacy: dict[int, Launcher] = {}  # predecessors' zygotes after restarts, until their workers are gone
        self.on_held: Callable[[Worker], None] = lambda w: None  # a worker answered a restart's `hold`
        self._reaper: asyncio.Task | None = None
        self._trim_at = 0.0  # when to hand freed memory back to the OS, after workers went

    @property
    def limits(self) -> Limits:
        return Limits(self.cfg.reap_grace, self.cfg.busy_stale, self.cfg.heartbeat_interval,
                      self.cfg.heartbeat_liveness)

    @property
    def lobby(self) -> Worker | None:
        return self.pool.lobby

    # -- start / stop ---------------------------------------------------------
    async def start(self) -> None:
        self.link.start()
        self._start_launcher(self.cfg.worker_config())
        self.start_workers()

    def start_workers(self) -> None:
        """The lobby, the warm pool and the reaper (after a restart's takeover, beside the adopted workers)."""
        self.pool.start_lobby()
        self.pool.refill()
        self._reaper = asyncio.create_task(self._reap_loop(), name="reaper")

    def stop_reaper(self) -> None:
        if self._reaper:
            self._reaper.cancel()
            self._reaper = None

    def adopt_launcher(self, fd: int, pid: int) -> None:
        """A restart: a predecessor's zygote, kept for the exits of the workers it forked (new ones come
        from our own, running the code now on disk); closed when the last of them is gone."""
        self.legacy[pid] = ZygoteLauncher.adopt(LaunchEvents(
            self._on_launched, self._on_failed, self._on_exited, lambda: self._on_legacy_lost(pid)), fd, pid)
        self.journal.add(JournalEntry(pid, create_time(pid), os.getpgid(pid) if _alive(pid) else pid, "zygote"))

    def launchers(self) -> list[Launcher]:
        """Every zygote whose workers live: ours, then the predecessors' (a restart hands them all over)."""
        return [self.launcher, *self.legacy.values()]

    def _start_launcher(self, worker_config: dict | None = None) -> None:
        self.launcher.start(worker_config)
        if self.launcher.pid:
            self.journal.add(JournalEntry(self.launcher.pid, create_time(self.launcher.pid), os.getpgid(0),
                                          "zygote"))
            self.journal.flush()

    async def lobby_ready(self, timeout: float = HELLO_TIMEOUT) -> bool:
        lobby = self.pool.lobby
        if lobby is None or lobby.hello is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(lobby.hello), timeout)
            return True
        except (asyncio.TimeoutError, asyncio.CancelledError, RuntimeError):
            return False

    def set_accepting(self, accepting: bool) -> bool:
        """Accept new sessions or not (drain); the one writer of `accepting`. False if shutting down."""
        if accepting and self.closing:
            return False
        if accepting != self.accepting:
            self.accepting = accepting
            if not self.closing:
                log.info("accepting new sessions again" if accepting else "draining: new sessions are refused",
                         sessions=len(self.sessions.sessions))
            if accepting:
                self.pool.refill()
            self.on_change()
        return True

    async def shutdown(self) -> None:
        """Finalize every worker through the stop ladder (history flushed), then the launcher."""
        self.closing = self.pool.closing = True
        self.set_accepting(False)
        self.stop_reaper()
        stops = [self.ladder.stop(w, Reason.SHUTDOWN) for w in self.workers.values()]
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
        self.launcher.close()
        for legacy in list(self.legacy.values()):
            legacy.close()
        self.legacy.clear()
        self.journal.clear()
        self.link.close()
        if self._own_ctx:
            self.ctx.term()

    # -- frames from workers --------------------------------------------------
    def _on_frame(self, w: Worker, frame: dict) -> None:
        now = time.monotonic()
        w.beat(now)
        kind = frame["k"]
        if kind == frames.EV:
            self._on_event(w, frame["seq"], frame["json"], now)
        elif kind == frames.EVS:
            for seq, _type, data in frame["items"]:
                self._on_event(w, seq, data, now)
        elif kind == frames.HB:
            self._on_heartbeat(w, frame, now)
        elif kind == frames.HELLO:
            self._on_hello(w, frame)
        elif kind == frames.BYE:
            log.debug("worker says bye", pid=w.pid, reason=frame["reason"])
        elif kind == frames.HELD:
            self.on_held(w)

    def _on_hello(self, w: Worker, frame: dict) -> None:
        if w.pid and frame["pid"] != w.pid:
            self.link.drop("wrong_pid", "hello with a different pid; ignored", expected=w.pid, got=frame["pid"])
            return
        log.debug("worker registered", pid=frame["pid"], kind=w.kind, ident=w.ident.decode(errors="replace"))
        w.ready = True
        w.state = lifecycle.IDLE
        meta = frame.get("meta") if isinstance(frame.get("meta"), dict) else {}
        w.meta.update(meta)
        caps = frame.get("caps")
        w.caps = frozenset(c for c in caps if isinstance(c, str)) if isinstance(caps, list) else frozenset()
        if w.kind == lifecycle.LOBBY:
            self.store_error = str(meta.get("store_error") or "")
            if self.store_error:
                log.error("session store unusable; new sessions are refused", error=self.store_error)
            if w is self.pool.lobby:
                self.end_notes.flush(w)
        self.pool.on_hello(w)
        if w.hello is not None and not w.hello.done():
            w.hello.set_result(True)
        self.on_change()

    def _on_heartbeat(self, w: Worker, frame: dict, now: float) -> None:
        meta = frame.get("meta")
        if isinstance(meta, dict):
            w.meta.update(meta)
        if w.beat(now, frame["state"]):
            if w.session is not None:  # a detached session's grace clock starts when its turn ends
                self.sessions.touch(w.session, now)
            self.on_change()

    def _on_event(self, w: Worker, seq: int, data: bytes, now: float) -> None:
        if w.session is None:
            log.debug("event from a worker without a session", pid=w.pid)
            return
        self.sessions.deliver(w.session, seq, data, now)

    # -- stopping and exits -----------------------------------------------------
    def begin_stop(self, w: Worker, reason: str) -> asyncio.Task:
        if w in self.pool.spares:
            self.pool.spares.remove(w)
        return self.ladder.begin(w, reason)

    async def stop(self, w: Worker, reason: str) -> None:
        await asyncio.shield(self.begin_stop(w, reason))

    def _on_launched(self, ident: bytes, pid: int) -> None:
        self.pool.on_launched(ident, pid)

    def _on_failed(self, ident: bytes, message: str) -> None:
        self.pool.on_failed(ident, message)

    def _on_exited(self, pid: int, status: int) -> None:
        w = self.workers.by_pid.get(pid)
        if w is not None:
            self._worker_gone(w, status)

    def _worker_gone(self, w: Worker, status: int | None) -> None:
        """The worker process is reaped: clean the tables, sweep its group, tell its clients."""
        if w not in self.workers:
            return
        w.exit_status = status
        self.launcher.signal(w.pid, signal.SIGKILL, alive=False)  # anything it started that is still around
        self.pool.forget(w)
        reason = w.stopping or Reason.WORKER_EXIT
        if not w.stopping:
            log.warning("worker exited on its own", pid=w.pid, kind=w.kind, status=status)
            self.reaps[Reason.WORKER_EXIT] += 1
        self.link.fail_pending(w, f"the worker for this call exited ({reason})")
        s = w.session
        if s is not None:
            self.sessions.end(s, reason)
            if s.key and not self.closing:  # shutdown: every worker finalizes itself, and the lobby is stopping
                self.end_notes.note(s.key, reason)
        if w.hello is not None and not w.hello.done():
            w.hello.set_exception(RuntimeError(f"worker exited before registering (status {status})"))
            w.hello.exception()
        if w.exited is not None and not w.exited.done():
            w.exited.set_result(status)
        if not self._trim_at:
            self._trim_at = time.monotonic() + 1.0
        if w is self.pool.lobby and not self.closing:
            self.pool.restart_lobby(w)
        if w.zygote in self.legacy and not any(x.zygote == w.zygote for x in self.workers.values()):
            self._close_legacy(w.zygote)
        self.pool.refill()
        self.on_change()

    def _close_legacy(self, pid: int) -> None:
        legacy = self.legacy.pop(pid, None)
        if legacy is not None:
            log.info("a predecessor's zygote has no workers left; closing it", pid=pid)
            self.journal.remove(pid)
            legacy.close()

    def _on_legacy_lost(self, pid: int) -> None:
        """A predecessor's zygote died: the workers it forked died with it."""
        if self.legacy.pop(pid, None) is not None:
            self.journal.remove(pid)
        for w in self.workers.values():
            if w.zygote == pid:
                self.launcher.kill(w.pid)
                self._worker_gone(w, None)

    def _on_launcher_lost(self) -> None:
        """The launcher died: its workers die with it (PDEATHSIG); account for them and start over."""
        self.journal.remove(self.launcher.pid)  # the dead launcher's row (a new one is added on restart)
        for w in self.workers.values():
            if w.zygote in self.legacy:
                continue  # a predecessor's zygote's, alive
            self.launcher.kill(w.pid)
            self._worker_gone(w, None)
        if not self.closing:
            self.pool.restart_launcher(self._start_launcher)

    def note_end(self, key: str, reason: str) -> None:
        """Ask the lobby to record why a session ended (a session the previous broker lost, at start)."""
        self.end_notes.note(key, reason)

    # -- the reaper tick ------------------------------------------------------
    async def _reap_loop(self) -> None:
        tick = min(0.2, self.cfg.heartbeat_interval / 2)
        while True:
            await asyncio.sleep(tick)
            try:
                self.tick(time.monotonic())
            except Exception as exc:
                log.error("reaper tick failed", error=repr(exc))
            if self._trim_at and time.monotonic() >= self._trim_at:
                self._trim_at = 0.0
                release_free_memory()

    def tick(self, now: float) -> None:
        """Apply the rules (decided by rules.plan_tick, testable without a loop) to every worker and session."""
        self.journal.flush()
        for w, reason in plan_tick(self.workers.values(), self.sessions.sessions.values(), now, self.limits,
                                   HELLO_TIMEOUT):
            if not w.ready:
                log.error("worker never registered", pid=w.pid, kind=w.kind)
            elif reason == Reason.HEARTBEAT_LOST:
                log.warning("worker heartbeat lost", pid=w.pid, kind=w.kind,
                            silent_for=round(now - w.last_heartbeat, 2))
            self.begin_stop(w, reason)

    # -- views ----------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        live = list(self.sessions.live())
        attached = sum(1 for s in live if s.attached)
        return {"sessions": len(live), "attached": attached, "detached": len(live) - attached,
                "spares": len(self.pool.spares), "workers": len(self.workers),
                "clients": len(self.sessions.clients)}



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
