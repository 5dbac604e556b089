"""The pool: workers started through the launcher, the warm spares, the lobby, and the spare handoff.

A create/resume takes a started, registered, idle spare (or a cold one from the
launcher) and hands it the call; the worker that answers with a `bind` becomes the
session's. A worker that dies before answering costs the client nothing: the call
goes to the next spare (START_TRIES workers at most). The lobby and the launcher are
restarted when they die, with an exponential backoff while they keep dying young, so
a crash loop costs a log line a backoff period instead of a busy loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from protocol import jsonrpc, lifecycle
from protocol.jsonrpc import RpcError
from protocol.lifecycle import Reason
from supervisor import log
from supervisor.broker.launcher import Launcher, create_time
from supervisor.broker.ladder import StopLadder
from supervisor.broker.link import Sink, WorkerLink
from supervisor.broker.sessions import Client, SessionTable
from supervisor.broker.table import Worker, WorkerTable
from supervisor.config import Config

HELLO_TIMEOUT = 15.0  # s a started worker has to register
START_TRIES = 3  # workers a create/resume may go through when they die before answering
START_DEADLINE = 60.0  # s a worker has to answer create/resume (the hermes runtime builds an agent)


@dataclass(slots=True)
class Backoff:
    """1 s doubling to `most` while the thing keeps dying within `young` s of its start; 0 after a good run.

    free_first: the first young death is retried at once (the fork server: a kill of it
    must not cost the next create a second), the backoff starts with the second."""

    young: float = 5.0
    most: float = 30.0
    free_first: bool = False
    delay: float = 0.0
    strikes: int = 0

    def reset(self) -> None:
        self.strikes, self.delay = 0, 0.0

    def next(self, started_at: float, now: float) -> float:
        if now - started_at >= self.young:
            self.strikes, self.delay = 0, 0.0
            return 0.0
        self.strikes += 1
        if self.free_first and self.strikes == 1:
            self.delay = 0.0
        else:
            self.delay = min(self.most, self.delay * 2 or 1.0)
        return self.delay


class Pool:
    def __init__(self, cfg: Config, endpoint: str, workers: WorkerTable, launcher: Launcher, link: WorkerLink,
                 sessions: SessionTable, ladder: StopLadder, accepting: Callable[[], bool]) -> None:
        self.cfg = cfg
        self.endpoint = endpoint
        self.workers = workers
        self.launcher = launcher
        self.link = link
        self.sessions = sessions
        self.ladder = ladder
        self.accepting = accepting
        self.closing = False
        self.spares: deque[Worker] = deque()
        self.lobby: Worker | None = None
        self.lobby_backoff = Backoff()
        self.launcher_backoff = Backoff(free_first=True)
        self.launcher_started_at = time.monotonic()
        self.launcher_served = False  # a worker it launched registered since it (re)started: not a crash loop
        self._ident = 0

    # -- starting workers ---------------------------------------------------------
    def spawn(self, kind: str) -> Worker:
        """Ask the launcher for a worker; on failure the returned record's `hello` already holds the error."""
        loop = asyncio.get_running_loop()
        self._ident += 1
        # unguessable: ZMQ's ROUTER ignores a second peer claiming an id in use, so whoever connects first
        # with a worker's id owns it; a predictable id let a local process take a future worker's calls
        ident = f"w{self._ident}.{secrets.token_hex(8)}".encode()
        w = Worker(ident=ident, kind=kind, hello=loop.create_future(), exited=loop.create_future())
        self.workers.add(w)
        config = self.cfg.worker_config() | {"kind": kind, "endpoint": self.endpoint}
        try:
            self.launcher.launch(ident, config)
        except (OSError, RuntimeError) as exc:
            log.error("spawn request failed", kind=kind, error=str(exc))
            self.forget(w)
            w.hello.set_exception(RuntimeError(f"spawn failed: {exc}"))
            w.hello.exception()
        return w

    def on_launched(self, ident: bytes, pid: int) -> None:
        w = self.workers.get(ident)
        if w is None:  # given up on before its fork was reported: it must not live on unjournaled
            log.warning("killing a worker forked after it was given up", pid=pid)
            self.launcher.kill(pid)
            return
        w.zygote = self.launcher.pid
        self.workers.launched(w, pid, create_time(pid))

    def on_failed(self, ident: bytes, message: str) -> None:
        w = self.workers.get(ident)
        log.error("worker spawn failed", error=message)
        if w is not None:
            self.forget(w)
            if w is self.lobby and not self.closing:
                self.restart_lobby(w)
            if w.hello and not w.hello.done():
                w.hello.set_exception(RuntimeError(message))
                w.hello.exception()

    def on_hello(self, w: Worker) -> None:
        if w.zygote and w.zygote == self.launcher.pid:
            self.launcher_served = True
        if w.kind == lifecycle.SPARE and not w.stopping:
            self.spares.append(w)

    def forget(self, w: Worker) -> None:
        self.workers.forget(w)
        if w in self.spares:
            self.spares.remove(w)

    def start_lobby(self) -> None:
        self.lobby = self.spawn(lifecycle.LOBBY)

    def restart_lobby(self, dead: Worker) -> None:
        """Start another lobby; back off while it keeps dying young."""
        delay = self.lobby_backoff.next(dead.spawned_at, time.monotonic())
        log.warning("lobby worker gone; starting another", delay=delay, status=dead.exit_status)

        def respawn() -> None:
            if not self.closing and (self.lobby is dead or self.lobby is None):
                self.start_lobby()

        if delay:
            asyncio.get_running_loop().call_later(delay, respawn)
        else:
            respawn()

    def restart_launcher(self, start: Callable[[], None]) -> None:
        """The launcher died (its workers with it): start it, the lobby and the pool again, with backoff.

        A launcher whose workers registered was serving, not crash-looping (killed from outside, say):
        it is restarted at once however young it was. The backoff is for one that dies before any
        worker of it said hello (an import error, a broken preload)."""
        if self.launcher_served:
            self.launcher_backoff.reset()
        self.launcher_served = False
        delay = self.launcher_backoff.next(self.launcher_started_at, time.monotonic())

        def again() -> None:
            if self.closing:
                return
            try:
                start()
            except OSError as exc:
                log.error("cannot restart the worker launcher", error=str(exc))
                self.launcher_started_at = time.monotonic()
                self.restart_launcher(start)
                return
            self.launcher_started_at = time.monotonic()
            if self.lobby is None or self.lobby not in self.workers:
                self.start_lobby()
            self.refill()

        if delay:
            log.warning("restarting the worker launcher after a backoff", delay=delay)
            asyncio.get_running_loop().call_later(delay, again)
        else:
            again()

    # -- the warm pool ------------------------------------------------------------
    def spawning_spares(self) -> int:
        return self.workers.count(lifecycle.SPARE, ready=False)

    def session_count(self) -> int:
        return self.workers.count(lifecycle.SESSION)

    def refill(self) -> None:
        if self.closing or not self.accepting():
            return
        while (len(self.spares) + self.spawning_spares() < self.cfg.warm_pool
               and self.session_count() + len(self.spares) + self.spawning_spares() < self.cfg.max_workers):
            w = self.spawn(lifecycle.SPARE)
            if w not in self.workers:
                return  # the launcher is down; it is restarted and the pool refilled from there

    async def take_spare(self, refill: bool = True) -> Worker:
        """A started, registered, idle worker: from the pool at once, or cold from the launcher.

        refill=False: the caller refills once its call is answered, so forking the next spare does not
        compete with that call for the CPU (on 2 cores that was ~2 ms of a ~5 ms create)."""
        while self.spares:
            w = self.spares.popleft()
            if not w.stopping and w in self.workers:
                w.kind = lifecycle.SESSION
                if refill:
                    self.refill()
                return w
        w = self.spawn(lifecycle.SPARE)
        w.kind = lifecycle.SESSION  # claimed before it says hello, so it never enters the pool
        try:
            await asyncio.wait_for(asyncio.shield(w.hello), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            self.ladder.begin(w, Reason.SPAWN_TIMEOUT)
            raise RuntimeError("worker did not register in time") from None
        if refill:
            self.refill()
        return w

    def release_spare(self, w: Worker) -> None:
        """A worker that did not take a session goes back to the pool (or away if the pool is full)."""
        if w.session is not None or w.stopping:
            return
        w.kind = lifecycle.SPARE
        if len(self.spares) + self.spawning_spares() < self.cfg.warm_pool and self.accepting():
            self.spares.append(w)
        else:
            self.ladder.begin(w, Reason.SURPLUS)

    # -- the spare handoff ------------------------------------------------------
    async def start_session(self, client: Client, rid: Any, method: str, params: dict, sink: Sink | None,
                            close_on_disconnect: bool = False) -> None:
        """Hand a create/resume to a spare worker; bind and attach when it answers.

        Only the last failure reaches the client (RpcError)."""
        try:
            for attempt in range(1, START_TRIES + 1):
                try:
                    w = await self.take_spare(refill=False)
                except RuntimeError as exc:
                    raise RpcError(jsonrpc.AGENT_INIT_FAILED, f"could not start a session worker: {exc}") from None
                if await self._hand_to(w, client, rid, method, params, sink, close_on_disconnect,
                                       last_try=attempt == START_TRIES):
                    return
                log.warning("session worker died before answering; trying another", method=method, pid=w.pid,
                            attempt=attempt)
        finally:
            asyncio.get_running_loop().call_soon(self.refill)  # the next spare is forked once this call is answered

    async def _hand_to(self, w: Worker, client: Client, rid: Any, method: str, params: dict, sink: Sink | None,
                       close_on_disconnect: bool, last_try: bool) -> bool:
        """False when the worker died before answering and the call may be retried elsewhere."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def on_reply(frame: dict) -> None:
            bind = frame.get("bind")
            if isinstance(bind, dict) and isinstance(bind.get("sid"), str) and bind["sid"]:
                self._bind(w, bind, frame, client, rid, sink, close_on_disconnect)
            elif "failed" in frame and not last_try:
                if not done.done():
                    done.set_result(False)
                return
            else:
                if sink is not None:
                    sink(frame["json"])
                if "failed" not in frame:
                    # it answered without taking a session, maybe half-way through building one: never re-pool it
                    self.ladder.begin(w, Reason.SURPLUS)
            if not done.done():
                done.set_result(True)

        try:
            sent = self.link.forward(w, method, params, rid, sink, on_reply)
        except Exception:
            self.release_spare(w)  # the call never reached the worker: it must not stay claimed and unreaped
            raise
        if not sent:
            # unreachable means gone: its exit report (or the heartbeat check) cleans it up; never re-pool it
            if last_try:
                raise RpcError(jsonrpc.AGENT_INIT_FAILED, "could not reach a new session worker")
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(done), START_DEADLINE)
        except asyncio.TimeoutError:
            self.ladder.begin(w, Reason.SPAWN_TIMEOUT)  # its pending call is failed when it exits: the client gets that
            raise RpcError(jsonrpc.AGENT_INIT_FAILED,
                           f"the session worker did not answer {method} within {START_DEADLINE:g}s") from None

    def _bind(self, w: Worker, bind: dict, frame: dict, client: Client, rid: Any, sink: Sink | None,
              close_on_disconnect: bool) -> None:
        now = time.monotonic()
        try:
            s = self.sessions.bind(w, bind["sid"], str(bind.get("key") or ""), close_on_disconnect, None, now)
        except ValueError as exc:
            log.error("refused a session bind", error=str(exc))
            self.ladder.begin(w, Reason.SURPLUS)
            if sink is not None:
                sink(jsonrpc.error(rid, jsonrpc.RESUME_FAILED, "the session worker misbehaved; try again"))
            return
        w.kind = lifecycle.SESSION
        w.meta.update(bind)  # type: ignore[typeddict-item]
        if w.pid:
            self.workers.journal.update(w.pid, kind=lifecycle.SESSION, session=s.key or s.sid)
        if sink is not None:
            sink(frame["json"])  # the answer first, then the events it may have missed
        if not client.closed:
            self.sessions.attach(client, s, now)

