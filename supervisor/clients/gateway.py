"""Client calls: the gateway's own methods, and routing of session and global methods to workers.

Design rule 1 (attach) and rule 7 (active_list) live here; the other lifecycle
rules live in the broker's reaper.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

from protocol import jsonrpc
from protocol.jsonrpc import RpcError
from protocol.methods import ATTACHING_METHODS, Scope, scope_of
from supervisor import log
from supervisor.broker.broker import Broker, Client
from supervisor.broker.table import Session, Worker

Sink = Callable[[str | bytes], None]
START_TRIES = 3  # workers a create/resume may go through when they die before answering
START_DEADLINE = 60.0  # s a worker has to answer create/resume (the hermes runtime builds an agent)


class Gateway:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.rpc_counts: dict[tuple[str, str], int] = {}
        self._resuming: dict[str, asyncio.Future] = {}
        self._own: dict[str, Callable[[Client, Any, dict, Sink | None], Any]] = {
            "gateway.ping": self.ping,
            "client.capabilities": self.capabilities,
            "session.create": self.create,
            "session.resume": self.resume,
            "session.activate": self.activate,
            "session.close": self.close,
            "session.active_list": self.active_list,
            "session.events.since": self.events_since,
        }

    def count(self, method: str, outcome: str) -> None:
        key = (method if len(method) <= 64 else method[:64], outcome)
        if len(self.rpc_counts) < 5000 or key in self.rpc_counts:
            self.rpc_counts[key] = self.rpc_counts.get(key, 0) + 1

    # -- entry ----------------------------------------------------------------
    async def call(self, client: Client, req: jsonrpc.Request, sink: Sink | None) -> None:
        """Handle one validated request; exactly one response goes to `sink` (none for a notification)."""
        method, params = req.method, req.params
        try:
            scope = scope_of(method, params)
            if scope is Scope.GATEWAY:
                await self._own[method](client, req.id, params, sink)
            elif scope is Scope.SESSION or self._hosted_session_call(params):
                self.route_session(client, req, sink)
            else:
                await self.route_global(req, sink)
            self.count(method, "ok")
        except RpcError as exc:
            self.count(method, str(exc.code))
            if sink is not None:
                sink(jsonrpc.error(req.id, exc.code, exc.message))
        except Exception as exc:  # a crash in one handler answers -32603 to that request only
            log.error("handler crashed", method=method, error=repr(exc))
            self.count(method, str(jsonrpc.INTERNAL_ERROR))
            if sink is not None:
                sink(jsonrpc.error(req.id, jsonrpc.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"))

    def _hosted_session_call(self, params: dict) -> bool:
        """The hermes runtime answers every method of its session (session.status, model.options, reload.mcp…):
        any call naming a live session goes to its worker, not only the ones in the method table."""
        ident = params.get("session_id")
        return (self.broker.cfg.runtime == "hermes" and isinstance(ident, str) and bool(ident)
                and self.broker.find(ident) is not None)

    def _live(self, ident: Any) -> Session:
        if not isinstance(ident, str) or not ident:
            raise RpcError(jsonrpc.SESSION_ID_REQUIRED, "session_id required")
        s = self.broker.find(ident)
        if s is None or s.worker.stopping:
            raise RpcError(jsonrpc.SESSION_NOT_FOUND, f"session not found: {ident[:64]}")
        return s

    def route_session(self, client: Client, req: jsonrpc.Request, sink: Sink | None) -> None:
        s = self._live(req.params.get("session_id"))
        # rule 1 and rule 3: attaching calls attach; any call naming a session nobody watches re-attaches
        if req.method in ATTACHING_METHODS or not s.attached:
            self.broker.attach(client, s)
        s.last_active = time.monotonic()
        params = dict(req.params, session_id=s.sid)
        if not self.broker.forward(s.worker, req.method, params, req.id, sink):
            raise RpcError(jsonrpc.SESSION_NOT_FOUND, "session's worker is gone")

    async def route_global(self, req: jsonrpc.Request, sink: Sink | None) -> None:
        lobby = self.broker.lobby
        if lobby is None or not lobby.ready:
            if not await self.broker.lobby_ready(5.0):
                raise RpcError(jsonrpc.INTERNAL_ERROR, "lobby worker unavailable, try again")
            lobby = self.broker.lobby
        assert lobby is not None
        if not self.broker.forward(lobby, req.method, req.params, req.id, sink):
            raise RpcError(jsonrpc.INTERNAL_ERROR, "lobby worker unavailable, try again")

    # -- gateway methods ------------------------------------------------------
    async def ping(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        if sink is not None:
            sink(jsonrpc.result(rid, {"ok": True}))

    async def capabilities(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        setattr(client, "capabilities", {k: params[k] for k in list(params)[:50]})
        if sink is not None:
            sink(jsonrpc.result(rid, {"ok": True}))

    async def _capacity(self) -> None:
        b = self.broker
        if not b.accepting:
            raise RpcError(jsonrpc.NO_CAPACITY, "the gateway is draining and accepts no new sessions")
        if b.store_error:
            raise RpcError(jsonrpc.STORE_UNAVAILABLE,
                           f"session store unusable, refusing to create sessions: {b.store_error}")
        while b.session_count() >= b.cfg.max_workers:  # again after each eviction: a racing create may take the slot
            victim = next((b.sessions[sid] for sid in _eviction(b)), None)
            if victim is None:
                raise RpcError(jsonrpc.NO_CAPACITY,
                               f"no capacity: {b.cfg.max_workers} sessions are live and none is detached and idle "
                               "(close one, or raise --max-workers)")
            await b.stop(victim.worker, "evicted")

    async def _start_in_spare(self, client: Client, rid: Any, method: str, params: dict, sink: Sink | None,
                              close_on_disconnect: bool = False) -> None:
        """Hand a create/resume to a spare worker; bind and attach when it answers.

        A worker that dies before answering costs the client nothing: the call goes to the
        next spare (up to START_TRIES workers), and only the last failure is reported.
        """
        b = self.broker
        try:
            for attempt in range(1, START_TRIES + 1):
                try:
                    w = await b.take_spare(refill=False)
                except RuntimeError as exc:
                    raise RpcError(jsonrpc.AGENT_INIT_FAILED, f"could not start a session worker: {exc}") from None
                if await self._hand_to(w, client, rid, method, params, sink, close_on_disconnect,
                                       last_try=attempt == START_TRIES):
                    return
                log.warning("session worker died before answering; trying another", method=method, pid=w.pid,
                            attempt=attempt)
        finally:
            asyncio.get_running_loop().call_soon(b.refill)  # the next spare is forked once this call is answered

    async def _hand_to(self, w: Worker, client: Client, rid: Any, method: str, params: dict, sink: Sink | None,
                       close_on_disconnect: bool, last_try: bool) -> bool:
        """False when the worker died before answering and the call may be retried elsewhere."""
        b = self.broker
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def on_reply(frame: dict) -> None:
            bind = frame.get("bind")
            if isinstance(bind, dict) and isinstance(bind.get("sid"), str) and bind["sid"]:
                try:
                    s = b.bind(w, bind["sid"], str(bind.get("key") or ""), bind)
                except ValueError as exc:
                    log.error("refused a session bind", error=str(exc))
                    b.begin_stop(w, "surplus")
                    if sink is not None:
                        sink(jsonrpc.error(rid, jsonrpc.RESUME_FAILED, "the session worker misbehaved; try again"))
                    if not done.done():
                        done.set_result(True)
                    return
                s.close_on_disconnect = close_on_disconnect
                if sink is not None:
                    sink(frame["json"])
                if not getattr(client, "closed", False):
                    b.attach(client, s)
                else:
                    s.detached_at = time.monotonic()
            elif "failed" in frame and not last_try:
                if not done.done():
                    done.set_result(False)
                return
            else:
                if sink is not None:
                    sink(frame["json"])
                if "failed" not in frame:
                    # it answered without taking a session, maybe half-way through building one: never re-pool it
                    b.begin_stop(w, "surplus")
            if not done.done():
                done.set_result(True)

        try:
            sent = b.forward(w, method, params, rid, sink, on_reply)
        except Exception:
            b.release_spare(w)  # the call never reached the worker: it must not stay claimed and unreaped
            raise
        if not sent:
            # unreachable means gone: its exit report (or the heartbeat check) cleans it up; never re-pool it
            if last_try:
                raise RpcError(jsonrpc.AGENT_INIT_FAILED, "could not reach a new session worker")
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(done), START_DEADLINE)
        except asyncio.TimeoutError:
            b.begin_stop(w, "spawn_timeout")  # its pending call is failed when it exits: the client gets that
            raise RpcError(jsonrpc.AGENT_INIT_FAILED,
                           f"the session worker did not answer {method} within {START_DEADLINE:g}s") from None

    async def create(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        cod = params.get("close_on_disconnect", False)
        if not isinstance(cod, bool):
            raise RpcError(jsonrpc.INVALID_PARAMS, "close_on_disconnect must be a boolean")
        await self._capacity()
        await self._start_in_spare(client, rid, "session.create", params, sink, close_on_disconnect=cod)

    async def resume(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        target = params.get("session_id")
        if not isinstance(target, str) or not target.strip():
            raise RpcError(jsonrpc.SESSION_ID_REQUIRED, "session_id required (a stored key or a title)")
        target = target.strip()
        while target in self._resuming:  # one worker per stored key, even under racing resumes
            await asyncio.shield(self._resuming[target])
        claim = self._resuming[target] = asyncio.get_running_loop().create_future()  # before any await
        try:
            s = self.broker.find(target) or self.broker.find_by_title(target)
            if s is not None and not s.worker.stopping:
                self._reattach(client, s, "session.resume", rid, params, sink)
                return
            if s is not None:
                await self.broker.stop(s.worker, s.worker.stopping or "client_close")
            await self._capacity()
            await self._start_in_spare(client, rid, "session.resume", params, sink)
        finally:
            del self._resuming[target]
            claim.set_result(None)

    def _reattach(self, client: Client, s: Session, method: str, rid: Any, params: dict, sink: Sink | None) -> None:
        """Warm re-attach: the same worker answers with its snapshot; then the client gets what it missed."""
        b = self.broker

        def on_reply(frame: dict) -> None:
            if sink is not None:
                sink(frame["json"])
            if s.sid in b.sessions and not getattr(client, "closed", False):
                b.attach(client, s)

        s.last_active = time.monotonic()
        if not b.forward(s.worker, method, dict(params, session_id=s.sid), rid, sink, on_reply):
            raise RpcError(jsonrpc.SESSION_NOT_FOUND, "session's worker is gone")

    async def activate(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        s = self._live(params.get("session_id"))
        self._reattach(client, s, "session.activate", rid, params, sink)

    async def close(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        ident = params.get("session_id")
        s = self.broker.find(ident) if isinstance(ident, str) and ident else None
        if s is None:
            if sink is not None:
                sink(jsonrpc.result(rid, {"closed": False}))
            return
        await self.broker.stop(s.worker, "client_close")
        if sink is not None:
            sink(jsonrpc.result(rid, {"closed": True}))

    async def active_list(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        if sink is not None:
            sink(jsonrpc.result(rid, {"sessions": self.active_rows(params.get("current_session_id"))}))

    def active_rows(self, current: Any) -> list[dict]:
        """Rule 7: attached sessions, detached ones younger than list_grace, and the caller's current one."""
        now, wall = time.monotonic(), time.time()
        rows = []
        for s in self.broker.sessions.values():
            if s.worker.stopping:
                continue
            detached_for = None if s.detached_at is None else round(now - s.detached_at, 3)
            is_current = current in (s.sid, s.key)
            if not (s.attached or is_current or (detached_for is not None and detached_for < self.broker.cfg.list_grace)):
                continue
            meta = s.worker.meta
            rows.append({
                "id": s.sid, "session_key": s.key, "title": meta.get("title") or "", "model": meta.get("model") or "",
                "status": s.state, "started_at": meta.get("started_at") or s.created_at,
                "last_active": round(wall - (now - s.last_active), 3),
                "message_count": int(meta.get("message_count") or 0), "preview": meta.get("preview") or "",
                "current": is_current, "attached": bool(s.attached), "attached_clients": len(s.attached),
                "detached_for": detached_for,
            })
        rows.sort(key=lambda r: r["started_at"])
        return rows

    async def events_since(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        s = self._live(params.get("session_id"))
        last_seen = params.get("last_seen", 0)
        if not isinstance(last_seen, int) or isinstance(last_seen, bool):
            raise RpcError(jsonrpc.INVALID_PARAMS, "last_seen must be an integer seq")
        events, truncated = s.since(last_seen)
        if sink is not None:
            body = b",".join(events).decode()
            sink('{"jsonrpc":"2.0","id":%s,"result":{"session_id":%s,"events":[%s],"truncated":%s,"last_seq":%d}}'
                 % (json.dumps(rid), json.dumps(s.sid), body, "true" if truncated else "false", s.worker.seq))


def _eviction(b: Broker) -> list[str]:
    from supervisor.broker.rules import eviction_order

    return eviction_order([(s.sid, s.detached_at, s.state) for s in b.sessions.values() if not s.worker.stopping])
