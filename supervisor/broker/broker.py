"""The broker: the ZeroMQ ROUTER, the heartbeat and detach tables, the stop ladder and the reaper tick.

It knows nothing about agents. It knows which worker owns which session, who is
attached, when each worker last spoke, and the lifecycle rules. Payloads from
workers (`json` in res/ev frames) are forwarded to clients as they are.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import psutil
import zmq

from protocol import frames, jsonrpc
from supervisor import log
from supervisor.broker.memory import release_free_memory
from supervisor.config import Config
from supervisor.ops.journal import Journal, JournalEntry
from supervisor.paths import RuntimePaths
from supervisor.broker.rules import Limits, plan_tick, session_reap_reason
from supervisor.broker.spawner import Spawner
from supervisor.broker.table import Session, Worker
from worker import preload

DRAIN_BATCH = 2000  # frames per drain before yielding to other callbacks
HELLO_TIMEOUT = 15.0


class Client(Protocol):
    id: int
    attached: set[str]

    def send(self, data: str | bytes) -> None: ...


@dataclass(slots=True)
class Pending:
    worker: Worker
    method: str
    sink: Callable[[str | bytes], None] | None  # None: a notification, the reply is dropped
    on_reply: Callable[[dict], None] | None = None
    client_id: Any = None  # the client's JSON-RPC id: a failure answer must carry it


class Broker:
    def __init__(self, cfg: Config, paths: RuntimePaths, journal: Journal) -> None:
        self.cfg = cfg
        self.paths = paths
        self.journal = journal
        self.started = time.time()
        self.workers: dict[bytes, Worker] = {}
        self.by_pid: dict[int, Worker] = {}
        self.sessions: dict[str, Session] = {}
        self.by_key: dict[str, Session] = {}
        self.spares: deque[Worker] = deque()
        self.lobby: Worker | None = None
        self.pending: dict[int, Pending] = {}
        self.clients: dict[int, Client] = {}
        self.reaps: Counter[str] = Counter()
        self.accepting = True
        self.closing = False
        self.store_error: str = ""
        self.on_change: Callable[[], None] = lambda: None
        self.on_worker_stopped: list[Callable[[str, float], None]] = []  # (reason, stop ladder seconds)
        self._rid = itertools.count(1)
        self._ident = itertools.count(1)
        self._reaper: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._lobby_backoff = 0.0
        self._noisy = log.Throttled()  # what a rogue local peer can provoke at will
        self.dropped_frames: Counter[str] = Counter()  # why: parts | malformed | unknown_peer | wrong_pid
        self._trim_at = 0.0  # when to hand freed memory back to the OS, after workers went
        self._end_notes: deque[bytes] = deque(maxlen=10_000)  # `ended` frames waiting for a lobby
        self.ctx = zmq.Context(io_threads=1)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.spawner = Spawner(self._on_spawned, self._on_exited, self._on_spawn_error,
                               self._on_zygote_lost)

    @property
    def limits(self) -> Limits:
        return Limits(self.cfg.reap_grace, self.cfg.busy_stale, self.cfg.heartbeat_interval,
                      self.cfg.heartbeat_liveness)

    # -- start / stop ---------------------------------------------------------
    async def start(self) -> None:
        endpoint = self.paths.broker_endpoint
        sock_path = endpoint[len("ipc://"):]
        if os.path.exists(sock_path):
            os.unlink(sock_path)  # we hold the lock: a leftover socket is from a dead broker
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, frames.MAX_FRAME)
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(endpoint)
        os.chmod(sock_path, 0o600)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.router.getsockopt(zmq.FD), self._drain)
        self.spawner.preload, self.spawner.env = preload.plan(self.cfg.worker_config())
        self.spawner.start()
        self.journal.add(JournalEntry(self.spawner.pid, _create_time(self.spawner.pid), os.getpgid(0), "zygote"))
        self.journal.flush()
        self.lobby = self.spawn("lobby")
        self.refill()
        self._reaper = asyncio.create_task(self._reap_loop(), name="reaper")

    async def lobby_ready(self, timeout: float = HELLO_TIMEOUT) -> bool:
        lobby = self.lobby
        if lobby is None or lobby.hello is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(lobby.hello), timeout)
            return True
        except (asyncio.TimeoutError, asyncio.CancelledError, RuntimeError):
            return False

    async def shutdown(self) -> None:
        """Finalize every worker through the stop ladder (history flushed), then the zygote."""
        self.closing = True
        self.accepting = False
        if self._reaper:
            self._reaper.cancel()
        stops = [self.stop(w, "shutdown") for w in list(self.workers.values())]
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
        self.spawner.close()
        self.journal.clear()
        loop = asyncio.get_running_loop()
        try:
            loop.remove_reader(self.router.getsockopt(zmq.FD))
        except (RuntimeError, zmq.ZMQError):
            pass
        self.router.close(linger=0)
        self.ctx.term()

    def _task(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the worker link ------------------------------------------------------
    def _drain(self) -> None:
        """Read the ROUTER until it is empty (its FD is edge-triggered), in bounded batches."""
        router = self.router
        for _ in range(DRAIN_BATCH):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("router receive failed", error=str(exc))
                return
            if len(parts) != 2:
                self.dropped_frames["parts"] += 1
                self._noisy.warning("dropped frame with unexpected parts", parts=len(parts))
                continue
            ident, data = parts
            try:
                frame = frames.unpack(data)
            except frames.FrameError as exc:
                self.dropped_frames["malformed"] += 1
                self._noisy.warning("dropped bad frame", peer=ident[:40].hex(), error=str(exc))
                continue
            worker = self.workers.get(ident)
            if worker is None:
                self.dropped_frames["unknown_peer"] += 1
                self._noisy.warning("dropped frame from unknown peer", peer=ident[:40].hex(), kind=frame["k"])
                continue
            try:
                self._on_frame(worker, frame)
            except Exception as exc:  # a bug in one frame's handling must not stop the loop
                log.error("frame handling failed", worker=worker.pid, kind=frame["k"], error=repr(exc))
        asyncio.get_running_loop().call_soon(self._drain)

    def _kick(self) -> None:
        """After sending, the FD may have swallowed an edge: check and drain."""
        if self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            asyncio.get_running_loop().call_soon(self._drain)

    def send(self, worker: Worker, data: bytes) -> bool:
        try:
            self.router.send_multipart([worker.ident, data], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone
            log.warning("send to worker failed", pid=worker.pid, error=str(exc))
            return False
        finally:
            self._kick()

    def _on_frame(self, w: Worker, frame: dict) -> None:
        now = time.monotonic()
        w.beat(now)
        kind = frame["k"]
        if kind == frames.EV:
            self._on_event(w, frame, now)
        elif kind == frames.EVS:
            for seq, type_, data in frame["items"]:
                self._on_event(w, {"seq": seq, "type": type_, "json": data}, now)
        elif kind == frames.RES:
            pending = self.pending.get(frame["rid"])
            if pending is None or pending.worker is not w:
                return  # only the worker a call went to may answer it
            del self.pending[frame["rid"]]
            if pending.on_reply is not None:
                pending.on_reply(frame)
            elif pending.sink is not None:
                pending.sink(frame["json"])
        elif kind == frames.HB:
            self._on_heartbeat(w, frame, now)
        elif kind == frames.HELLO:
            self._on_hello(w, frame)
        elif kind == frames.BYE:
            log.debug("worker says bye", pid=w.pid, reason=frame["reason"])

    def _on_hello(self, w: Worker, frame: dict) -> None:
        if w.pid and frame["pid"] != w.pid:
            self.dropped_frames["wrong_pid"] += 1
            self._noisy.warning("hello with a different pid; ignored", expected=w.pid, got=frame["pid"])
            return
        log.debug("worker registered", pid=frame["pid"], kind=w.kind, ident=w.ident.decode(errors="replace"))
        w.ready = True
        w.state = "idle"
        meta = frame.get("meta") if isinstance(frame.get("meta"), dict) else {}
        w.meta.update(meta)
        if w.kind == "lobby":
            self.store_error = str(meta.get("store_error") or "")
            if self.store_error:
                log.error("session store unusable; new sessions are refused", error=self.store_error)
            while self._end_notes and w is self.lobby and self.send(w, self._end_notes[0]):
                self._end_notes.popleft()
        elif w.kind == "spare" and not w.stopping:
            self.spares.append(w)
        if w.hello is not None and not w.hello.done():
            w.hello.set_result(True)
        self.on_change()

    def _on_heartbeat(self, w: Worker, frame: dict, now: float) -> None:
        state = frame["state"]
        meta = frame.get("meta")
        if isinstance(meta, dict):
            w.meta.update(meta)
        if w.beat(now, state):  # a detached session's grace clock starts when its turn ends
            self.on_change()

    def _on_event(self, w: Worker, frame: dict, now: float) -> None:
        s = w.session
        if s is None:
            log.debug("event from a worker without a session", pid=w.pid, type=frame["type"])
            return
        data = frame["json"]
        seq = frame["seq"]
        w.seq = seq
        s.last_active = now
        s.remember(seq, data, self.cfg.replay_events, self.cfg.replay_bytes)
        if s.attached:
            for cid in s.attached:
                client = self.clients.get(cid)
                if client is not None:
                    client.send(data)
            s.delivered_seq = seq

    # -- spawning and the warm pool ------------------------------------------
    def spawn(self, kind: str) -> Worker:
        """Ask the zygote for a worker; on failure the returned record's `hello` already holds the error."""
        loop = asyncio.get_running_loop()
        # unguessable: ZMQ's ROUTER ignores a second peer claiming an id in use, so whoever connects first
        # with a worker's id owns it; a predictable id let a local process take a future worker's calls
        ident = f"w{next(self._ident)}.{secrets.token_hex(8)}".encode()
        w = Worker(ident=ident, kind=kind, hello=loop.create_future(), exited=loop.create_future())
        self.workers[ident] = w
        config = self.cfg.worker_config() | {"kind": kind, "endpoint": self.paths.broker_endpoint}
        try:
            self.spawner.spawn(ident, config)
        except (OSError, RuntimeError) as exc:
            log.error("spawn request failed", kind=kind, error=str(exc))
            self._forget(w)
            w.hello.set_exception(RuntimeError(f"spawn failed: {exc}"))
            w.hello.exception()
        return w

    def _on_spawned(self, ident: bytes, pid: int) -> None:
        w = self.workers.get(ident)
        if w is None:  # given up on before its fork was reported: it must not live on unjournaled
            log.warning("killing a worker forked after it was given up", pid=pid)
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        w.pid = pid
        w.create_time = _create_time(pid)
        self.by_pid[pid] = w
        self.journal.add(JournalEntry(pid, w.create_time, pid, w.kind))

    def _on_spawn_error(self, ident: bytes, message: str) -> None:
        w = self.workers.get(ident)
        log.error("worker spawn failed", error=message)
        if w is not None:
            self._forget(w)
            if w is self.lobby and not self.closing:
                self._restart_lobby(w)
            if w.hello and not w.hello.done():
                w.hello.set_exception(RuntimeError(message))
                w.hello.exception()

    def spawning_spares(self) -> int:
        return sum(1 for w in self.workers.values() if w.kind == "spare" and not w.ready and not w.stopping)

    def session_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.kind == "session" and not w.stopping)

    def refill(self) -> None:
        if self.closing or not self.accepting:
            return
        while (len(self.spares) + self.spawning_spares() < self.cfg.warm_pool
               and self.session_count() + len(self.spares) + self.spawning_spares() < self.cfg.max_workers):
            w = self.spawn("spare")
            if w.ident not in self.workers:
                return  # the fork server is down; it is restarted and the pool refilled from there

    async def take_spare(self, refill: bool = True) -> Worker:
        """A started, registered, idle worker: from the pool at once, or cold from the zygote.

        refill=False: the caller refills once its call is answered, so forking the next spare does not
        compete with that call for the CPU (on 2 cores that was ~2 ms of a ~5 ms create)."""
        while self.spares:
            w = self.spares.popleft()
            if not w.stopping and w.ident in self.workers:
                w.kind = "session"
                if refill:
                    self.refill()
                return w
        w = self.spawn("spare")
        w.kind = "session"  # claimed before it says hello, so it never enters the pool
        try:
            await asyncio.wait_for(asyncio.shield(w.hello), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            self.begin_stop(w, "spawn_timeout")
            raise RuntimeError("the new worker did not register in time") from None
        finally:
            if refill:
                self.refill()
        return w

    def release_spare(self, w: Worker) -> None:
        """A worker that did not take a session goes back to the pool (or away if the pool is full)."""
        if w.session is not None or w.stopping:
            return
        w.kind = "spare"
        if len(self.spares) + self.spawning_spares() < self.cfg.warm_pool and self.accepting:
            self.spares.append(w)
        else:
            self.begin_stop(w, "surplus")

    # -- calls ----------------------------------------------------------------
    def forward(self, w: Worker, method: str, params: dict, client_id: Any,
                sink: Callable[[str | bytes], None] | None,
                on_reply: Callable[[dict], None] | None = None) -> bool:
        rid = next(self._rid)
        # pack first: params msgpack cannot carry (an integer over 64 bits) raise here, before anything is registered
        data = frames.pack(frames.CALL, rid=rid, id=client_id, method=method, params=params)
        self.pending[rid] = Pending(w, method, sink, on_reply, client_id)
        ok = self.send(w, data)
        if not ok:
            self.pending.pop(rid, None)
        return ok

    def _fail_pending(self, w: Worker, why: str) -> None:
        for rid, p in list(self.pending.items()):
            if p.worker is w:
                del self.pending[rid]
                text = jsonrpc.error(p.client_id, jsonrpc.INTERNAL_ERROR, why)
                if p.on_reply is not None:
                    p.on_reply({"k": "res", "rid": rid, "json": text.encode(), "failed": why})
                elif p.sink is not None:
                    p.sink(text)

    # -- sessions: bind, attach, detach --------------------------------------
    def bind(self, w: Worker, sid: str, key: str, meta: dict) -> Session:
        """Record the session a worker took; ids already live elsewhere are refused (ValueError)."""
        if sid in self.sessions or (key and key in self.by_key):
            raise ValueError(f"worker pid {w.pid} claimed a session id or key that is already live")
        s = Session(sid=sid, key=key, worker=w)
        w.kind = "session"
        w.session = s
        w.meta.update(meta)
        self.sessions[sid] = s
        if key:
            self.by_key[key] = s
        if w.pid:
            self.journal.update(w.pid, kind="session", session=key or sid)
        self.on_change()
        return s

    def attach(self, client: Client, s: Session) -> None:
        """Attach a client; if nobody was watching, first deliver what it missed, in order."""
        if client.id in s.attached:
            return
        if not s.attached and s.replay:
            missed, truncated = s.since(s.delivered_seq)
            if truncated:
                note = jsonrpc.event("notification.show", s.sid, {
                    "kind": "warning", "text": "Some events were dropped while you were away; "
                    "the replay buffer was full. Reload the history for the full conversation."})
                client.send(note)
            for data in missed:
                client.send(data)
            if missed:
                s.delivered_seq = s.replay[-1][0]
        s.attach(client.id, time.monotonic())
        client.attached.add(s.sid)
        self.on_change()

    def detach_client(self, client: Client) -> None:
        self.clients.pop(client.id, None)
        now = time.monotonic()
        for sid in list(client.attached):
            s = self.sessions.get(sid)
            if s is None:
                continue
            if s.detach(client.id, now):
                log.info("session detached", session=s.sid, key=s.key, pid=s.worker.pid, state=s.state)
                if s.close_on_disconnect:
                    self._check(s, now)
        client.attached.clear()
        self.on_change()

    def find(self, ident: str) -> Session | None:
        """A live session by runtime id or stored key."""
        return self.sessions.get(ident) or self.by_key.get(ident)

    def find_by_title(self, title: str) -> Session | None:
        for s in self.sessions.values():
            if title and s.worker.meta.get("title") == title:
                return s
        return None

    def session_event(self, s: Session, type_: str, payload: dict) -> None:
        """An event the broker itself emits for a session (numbered after the worker's last)."""
        s.worker.seq += 1
        data = jsonrpc.event(type_, s.sid, payload, s.worker.seq).encode()
        s.remember(s.worker.seq, data, self.cfg.replay_events, self.cfg.replay_bytes)
        for cid in s.attached:
            client = self.clients.get(cid)
            if client is not None:
                client.send(data)
        if s.attached:
            s.delivered_seq = s.worker.seq  # or a later re-attach would replay it a second time

    # -- stopping -------------------------------------------------------------
    def begin_stop(self, w: Worker, reason: str) -> asyncio.Task:
        """Mark the worker stopping now, so no call can re-attach it, and run its stop ladder once."""
        if w.ladder is None:
            w.stopping = reason
            w.state = "closing"
            if w in self.spares:
                self.spares.remove(w)
            w.ladder = self._task(self._ladder(w, reason))
        return w.ladder

    async def stop(self, w: Worker, reason: str) -> None:
        """The stop ladder: ask -> SIGTERM the group -> SIGKILL the group -> reaped."""
        await asyncio.shield(self.begin_stop(w, reason))

    async def _ladder(self, w: Worker, reason: str) -> None:
        s = w.session
        detached_for = round(time.monotonic() - s.detached_at, 3) if s and s.detached_at else 0.0
        t0 = time.monotonic()
        step = "ask"
        assert w.exited is not None
        if w.pid == 0 and not w.ready:
            # not forked yet (or fork failed): wait briefly for the pid before escalating
            try:
                await asyncio.wait_for(asyncio.shield(w.hello), self.cfg.stop_timeout / 2)
            except (asyncio.TimeoutError, RuntimeError):
                pass
        if reason == "heartbeat_lost":
            step = "kill"
            self._signal_group(w, signal.SIGKILL)
        elif not self.send(w, frames.pack(frames.STOP, reason=reason)):
            step = "term"  # not connected yet (or gone): nobody to ask, and nothing unflushed
            self._signal_group(w, signal.SIGTERM)
        for sig, at in ((signal.SIGTERM, self.cfg.stop_timeout / 2), (signal.SIGKILL, self.cfg.stop_timeout)):
            if w.exited.done() or step == "kill":
                break
            try:
                await asyncio.wait_for(asyncio.shield(w.exited), max(0.0, t0 + at - time.monotonic()))
                break
            except asyncio.TimeoutError:
                step = "term" if sig == signal.SIGTERM else "kill"
                self._signal_group(w, sig)
        try:
            await asyncio.wait_for(asyncio.shield(w.exited), 2.0)
        except asyncio.TimeoutError:
            log.error("worker did not exit after SIGKILL", pid=w.pid)
            self._worker_gone(w, None)
        took = round(time.monotonic() - t0, 3)
        for hook in self.on_worker_stopped:
            hook(reason, took)
        self.reaps[reason] += 1
        log.info("worker stopped", session=s.sid if s else "", key=s.key if s else "", pid=w.pid, kind=w.kind,
                 reason=reason, detached_for=detached_for, ladder=step, took=took)

    def _signal_group(self, w: Worker, sig: int, alive: bool = True) -> None:
        """Signal the worker's group; `alive` (not yet reaped) also reaches a worker not yet leading one."""
        if not w.pid:
            return
        try:
            os.killpg(w.pid, sig)
        except ProcessLookupError:
            if alive:  # forked but not yet its own group leader; never after the pid was reaped
                try:
                    os.kill(w.pid, sig)
                except ProcessLookupError:
                    pass
        except PermissionError as exc:
            log.error("cannot signal worker group", pid=w.pid, error=str(exc))

    def _on_exited(self, pid: int, status: int) -> None:
        w = self.by_pid.get(pid)
        if w is not None:
            self._worker_gone(w, status)

    def _forget(self, w: Worker) -> None:
        self.workers.pop(w.ident, None)
        if w.pid:
            self.by_pid.pop(w.pid, None)
            self.journal.remove(w.pid)
        if w in self.spares:
            self.spares.remove(w)

    def _worker_gone(self, w: Worker, status: int | None) -> None:
        """The worker process is reaped: clean the tables, sweep its group, tell its clients."""
        if w.ident not in self.workers:
            return
        w.exit_status = status
        self._signal_group(w, signal.SIGKILL, alive=False)  # anything it started that is still around
        self._forget(w)
        reason = w.stopping or "worker_exit"
        if not w.stopping:
            log.warning("worker exited on its own", pid=w.pid, kind=w.kind, status=status)
            self.reaps["worker_exit"] += 1
        self._fail_pending(w, f"the worker for this call exited ({reason})")
        s = w.session
        if s is not None:
            if reason != "client_close":
                if reason in ("worker_exit", "heartbeat_lost"):
                    self.session_event(s, "error", {"message": f"the session's worker is gone ({reason})"})
                self.session_event(s, "session.reclaimed", {"session_id": s.sid, "stored_session_id": s.key,
                                                            "reason": reason})
            self.sessions.pop(s.sid, None)
            if self.by_key.get(s.key) is s:
                self.by_key.pop(s.key, None)
            if s.key:
                self.note_end(s.key, reason)
            for cid in s.attached:
                client = self.clients.get(cid)
                if client is not None:
                    client.attached.discard(s.sid)
        if w.hello is not None and not w.hello.done():
            w.hello.set_exception(RuntimeError(f"worker exited before registering (status {status})"))
            w.hello.exception()
        if w.exited is not None and not w.exited.done():
            w.exited.set_result(status)
        if not self._trim_at:
            self._trim_at = time.monotonic() + 1.0
        if w is self.lobby and not self.closing:
            self._restart_lobby(w)
        self.refill()
        self.on_change()

    def note_end(self, key: str, reason: str) -> None:
        """Ask the lobby to record why a session ended, for a worker that could not (hard kill, crash).

        Sent for every session whose worker is gone: the lobby writes only a row that no
        finalize ended and no later resume re-opened, so a clean stop costs one no-op update."""
        if self.closing:
            return  # shutdown: every worker finalizes itself, and the lobby is stopping too
        note = frames.pack(frames.ENDED, key=key, reason=reason, at=time.time())
        lobby = self.lobby
        if lobby is not None and lobby.ready and not lobby.stopping and lobby.ident in self.workers \
                and not self._end_notes and self.send(lobby, note):
            return
        self._end_notes.append(note)  # sent when the next lobby says hello

    def _restart_lobby(self, dead: Worker) -> None:
        """Start another lobby; back off (1 s doubling to 30 s) while it keeps dying young."""
        young = time.monotonic() - dead.spawned_at < 5.0
        self._lobby_backoff = min(30.0, self._lobby_backoff * 2 or 1.0) if young else 0.0
        log.warning("lobby worker gone; starting another", delay=self._lobby_backoff, status=dead.exit_status)

        def respawn() -> None:
            if not self.closing and (self.lobby is dead or self.lobby is None):
                self.lobby = self.spawn("lobby")

        if self._lobby_backoff:
            asyncio.get_running_loop().call_later(self._lobby_backoff, respawn)
        else:
            respawn()

    def _on_zygote_lost(self) -> None:
        """The fork server died: its workers die with it (PDEATHSIG); account for them and start over."""
        self.journal.remove(self.spawner.pid)  # the dead fork server's row (a new one is added below)
        for w in list(self.workers.values()):
            if w.pid:
                try:
                    os.killpg(w.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self._worker_gone(w, None)
        if self.closing:
            return
        self.spawner.start()
        self.journal.add(JournalEntry(self.spawner.pid, _create_time(self.spawner.pid), os.getpgid(0), "zygote"))
        if self.lobby is None or self.lobby.ident not in self.workers:
            self.lobby = self.spawn("lobby")
        self.refill()

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
        for w, reason in plan_tick(self.workers.values(), self.sessions.values(), now, self.limits, HELLO_TIMEOUT):
            if not w.ready:
                log.error("worker never registered", pid=w.pid, kind=w.kind)
            elif reason == "heartbeat_lost":
                log.warning("worker heartbeat lost", pid=w.pid, kind=w.kind,
                            silent_for=round(now - w.last_heartbeat, 2))
            self.begin_stop(w, reason)

    def _check(self, s: Session, now: float) -> None:
        if s.worker.stopping:
            return
        reason = session_reap_reason(s, now, self.limits)
        if reason is not None:
            self.begin_stop(s.worker, reason)

    # -- views ----------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        live = [s for s in self.sessions.values() if not s.worker.stopping]
        attached = sum(1 for s in live if s.attached)
        return {"sessions": len(live), "attached": attached, "detached": len(live) - attached,
                "spares": len(self.spares), "workers": len(self.workers), "clients": len(self.clients)}


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0
