"""Client calls: the gateway's own methods, and routing of session and global methods to workers.

Rule 1 (which calls attach) and rule 7 (what active_list lists) are decided here;
the attachment itself is the detach table's (supervisor/broker/sessions.py), the
other rules are supervisor/broker/rules.py, applied by the broker's reaper tick.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

from protocol import jsonrpc, lifecycle
from protocol.jsonrpc import RpcError
from protocol.lifecycle import Reason
from protocol.methods import ATTACHING_METHODS, Scope, scope_of
from supervisor import log
from supervisor.broker.broker import Broker
from supervisor.broker.link import Sink
from supervisor.broker.rules import eviction_order
from supervisor.broker.sessions import Client
from supervisor.broker.table import Session


class Gateway:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.rpc_counts: dict[tuple[str, str], int] = {}
        self._resuming: dict[str, asyncio.Future] = {}
        self._starting: dict[int, int] = {}  # client id -> its create/resume calls waiting for a worker
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
        """A worker that announced `hosts_session_methods` (the hermes runtime: session.status, model.options,
        reload.mcp…) gets any call naming its session, not only the ones in the method table."""
        ident = params.get("session_id")
        s = self.broker.sessions.find(ident) if isinstance(ident, str) and ident else None
        return s is not None and lifecycle.HOSTS_SESSION_METHODS in s.worker.caps

    def _live(self, ident: Any) -> Session:
        if not isinstance(ident, str) or not ident:
            raise RpcError(jsonrpc.SESSION_ID_REQUIRED, "session_id required")
        s = self.broker.sessions.find(ident)
        if s is None or s.worker.stopping:
            raise RpcError(jsonrpc.SESSION_NOT_FOUND, f"session not found: {ident[:64]}")
        return s

    def route_session(self, client: Client, req: jsonrpc.Request, sink: Sink | None) -> None:
        s = self._live(req.params.get("session_id"))
        # rule 1 and rule 3: attaching calls attach; any call naming a session nobody watches re-attaches
        now = time.monotonic()
        if req.method in ATTACHING_METHODS or not s.attached:
            self.broker.sessions.attach(client, s, now)
        self.broker.sessions.touch(s, now)
        params = dict(req.params, session_id=s.sid)
        if not self.broker.link.forward(s.worker, req.method, params, req.id, sink):
            raise RpcError(jsonrpc.SESSION_NOT_FOUND, "session's worker is gone")

    async def route_global(self, req: jsonrpc.Request, sink: Sink | None) -> None:
        lobby = self.broker.lobby
        if lobby is None or not lobby.ready:
            if not await self.broker.lobby_ready(5.0):
                raise RpcError(jsonrpc.INTERNAL_ERROR, "lobby worker unavailable, try again")
            lobby = self.broker.lobby
        assert lobby is not None
        if not self.broker.link.forward(lobby, req.method, req.params, req.id, sink):
            raise RpcError(jsonrpc.INTERNAL_ERROR, "lobby worker unavailable, try again")

    # -- gateway methods ------------------------------------------------------
    async def ping(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        if sink is not None:
            sink(jsonrpc.result(rid, {"ok": True}))

    async def capabilities(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        setattr(client, "capabilities", {k: params[k] for k in list(params)[:50]})
        if sink is not None:
            sink(jsonrpc.result(rid, {"ok": True}))

    async def _capacity(self, client: Client) -> None:
        """Room for one more session: refuse while draining or with a broken store; at max_workers evict the
        longest-detached idle session (rules.eviction_order), or refuse; never for a connection at its own cap."""
        b = self.broker
        if not b.accepting:
            raise RpcError(jsonrpc.NO_CAPACITY, "the gateway is draining and accepts no new sessions")
        if b.store_error:
            raise RpcError(jsonrpc.STORE_UNAVAILABLE,
                           f"session store unusable, refusing to create sessions: {b.store_error}")
        while b.pool.session_count() >= b.cfg.max_workers:  # again after each eviction: a racing create may take it
            victim = next((b.sessions.sessions[sid] for sid in _eviction(b)), None)
            if victim is None:
                raise RpcError(jsonrpc.NO_CAPACITY,
                               f"no capacity: {b.cfg.max_workers} sessions are live and none is detached and idle "
                               "(close one, or raise --max-workers)")
            self._client_cap(client)  # checked before evicting anyone else's session
            await b.stop(victim.worker, Reason.EVICTED)
        self._client_cap(client)

    def _client_cap(self, client: Client) -> None:
        limit = self.broker.cfg.client_sessions_limit
        held = len(self.broker.sessions.watching(client)) + self._starting.get(client.id, 0)
        if held >= limit:  # one connection cannot take every slot, or evict everyone else's sessions
            raise RpcError(jsonrpc.NO_CAPACITY, f"no capacity: this connection already holds {held} sessions "
                           f"(max_client_sessions={limit}); close one first")

    async def create(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        cod = params.get("close_on_disconnect", False)
        if not isinstance(cod, bool):
            raise RpcError(jsonrpc.INVALID_PARAMS, "close_on_disconnect must be a boolean")
        await self._capacity(client)
        await self._start(client, rid, "session.create", params, sink, cod)

    async def resume(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        target = params.get("session_id")
        if not isinstance(target, str) or not target.strip():
            raise RpcError(jsonrpc.SESSION_ID_REQUIRED, "session_id required (a stored key or a title)")
        target = target.strip()
        while target in self._resuming:  # one worker per stored key, even under racing resumes
            await asyncio.shield(self._resuming[target])
        claim = self._resuming[target] = asyncio.get_running_loop().create_future()  # before any await
        try:
            s = self.broker.sessions.find(target) or self.broker.sessions.find_by_title(target)
            if s is not None and not s.worker.stopping:
                self._reattach(client, s, "session.resume", rid, params, sink)
                return
            if s is not None:
                await self.broker.stop(s.worker, s.worker.stopping or Reason.CLIENT_CLOSE)
            await self._capacity(client)
            await self._start(client, rid, "session.resume", params, sink, False)
        finally:
            del self._resuming[target]
            claim.set_result(None)

    async def _start(self, client: Client, rid: Any, method: str, params: dict, sink: Sink | None,
                     close_on_disconnect: bool) -> None:
        self._starting[client.id] = self._starting.get(client.id, 0) + 1
        try:
            await self.broker.pool.start_session(client, rid, method, params, sink, close_on_disconnect)
        finally:
            left = self._starting.pop(client.id) - 1
            if left:
                self._starting[client.id] = left

    def _reattach(self, client: Client, s: Session, method: str, rid: Any, params: dict, sink: Sink | None) -> None:
        """Warm re-attach: the same worker answers with its snapshot; then the client gets what it missed."""
        b = self.broker

        def on_reply(frame: dict) -> None:
            if sink is not None:
                sink(frame["json"])
            if s.sid in b.sessions.sessions and not client.closed:
                b.sessions.attach(client, s, time.monotonic())

        b.sessions.touch(s, time.monotonic())
        if not b.link.forward(s.worker, method, dict(params, session_id=s.sid), rid, sink, on_reply):
            raise RpcError(jsonrpc.SESSION_NOT_FOUND, "session's worker is gone")

    async def activate(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        s = self._live(params.get("session_id"))
        self._reattach(client, s, "session.activate", rid, params, sink)

    async def close(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        ident = params.get("session_id")
        s = self.broker.sessions.find(ident) if isinstance(ident, str) and ident else None
        if s is None:
            if sink is not None:
                sink(jsonrpc.result(rid, {"closed": False}))
            return
        self.broker.sessions.leave(client, s, time.monotonic())  # the others watching it get session.reclaimed
        await self.broker.stop(s.worker, Reason.CLIENT_CLOSE)
        if sink is not None:
            sink(jsonrpc.result(rid, {"closed": True}))

    async def active_list(self, client: Client, rid: Any, params: dict, sink: Sink | None) -> None:
        if sink is not None:
            sink(jsonrpc.result(rid, {"sessions": self.active_rows(params.get("current_session_id"))}))

    def active_rows(self, current: Any) -> list[dict]:
        """Rule 7: attached sessions, detached ones younger than list_grace, and the caller's current one."""
        now, wall = time.monotonic(), time.time()
        rows = []
        for s in self.broker.sessions.live():
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
    return eviction_order([(s.sid, s.detached_at, s.state) for s in b.sessions.live()])
