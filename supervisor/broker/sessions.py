"""The detach table: which client watches which session, since when nobody does, and what they missed.

The one writer of every session field: bind, attach (with the replay of what the
client missed), detach, the activity clock (`last_active`), `close_on_disconnect`,
the replay buffer and the event fan-out to attached clients. Rule 1 (attaching
calls attach) is the gateway's decision; rule 2 (a disconnect detaches) and the
immediate check of rule 4 for a `close_on_disconnect` session happen here; the
rules themselves are supervisor/broker/rules.py.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

from protocol import jsonrpc
from supervisor import log
from supervisor.broker.rules import Limits, session_reap_reason
from supervisor.broker.table import Session, Worker


class Client(Protocol):
    """A connected client as the broker sees it: an id, a way to send, and whether it is gone."""

    id: int
    closed: bool

    def send(self, data: str | bytes) -> None: ...


class SessionTable:
    def __init__(self, limits: Callable[[], Limits], replay_events: Callable[[], int],
                 replay_bytes: Callable[[], int], reap: Callable[[Worker, str], object]) -> None:
        self.sessions: dict[str, Session] = {}
        self.by_key: dict[str, Session] = {}
        self.clients: dict[int, Client] = {}
        self._watching: dict[int, set[str]] = {}  # client id -> sids it is attached to (the other side of .attached)
        self._limits = limits
        self._replay_events = replay_events
        self._replay_bytes = replay_bytes
        self._reap = reap  # begin a worker's stop (the immediate rule-4 check)
        self.on_change: Callable[[], None] = lambda: None

    # -- clients ----------------------------------------------------------------
    def connect(self, client: Client) -> None:
        self.clients[client.id] = client
        self._watching[client.id] = set()

    def disconnect(self, client: Client, now: float) -> None:
        """Rule 2: a connection that ends detaches from every session it watched; close_on_disconnect reaps now."""
        self.clients.pop(client.id, None)
        for sid in self._watching.pop(client.id, ()):
            s = self.sessions.get(sid)
            if s is None or client.id not in s.attached:
                continue
            s.attached.discard(client.id)
            if s.attached:
                continue
            s.detached_at = now
            log.info("session detached", session=s.sid, key=s.key, pid=s.worker.pid, state=s.state)
            if s.close_on_disconnect and not s.worker.stopping:
                reason = session_reap_reason(s, now, self._limits())
                if reason is not None:
                    self._reap(s.worker, reason)
        self.on_change()

    def leave(self, client: Client, s: Session, now: float) -> None:
        """One client lets go of one session it is closing (it is told by the close's answer, not by an event)."""
        if client.id in s.attached:
            s.attached.discard(client.id)
            self._watching.get(client.id, set()).discard(s.sid)
            if not s.attached:
                s.detached_at = now
            self.on_change()

    def watching(self, client: Client) -> frozenset[str]:
        return frozenset(self._watching.get(client.id, ()))

    # -- sessions ---------------------------------------------------------------
    def bind(self, w: Worker, sid: str, key: str, close_on_disconnect: bool, client: Client | None,
             now: float) -> Session:
        """Record the session a worker took and attach the client that asked; ids already live are refused."""
        if sid in self.sessions or (key and key in self.by_key):
            raise ValueError(f"worker pid {w.pid} claimed a session id or key that is already live")
        s = Session(sid=sid, key=key, worker=w, close_on_disconnect=close_on_disconnect, last_active=now)
        w.session = s
        self.sessions[sid] = s
        if key:
            self.by_key[key] = s
        if client is not None and not client.closed and client.id in self.clients:
            self.attach(client, s, now)
        else:
            s.detached_at = now  # the client left while its session started: the grace clock runs from now
        self.on_change()
        return s

    def rewind(self, sid: str, first_unsent: int) -> None:
        """A restart's cut left `first_unsent` and what followed unsent to a client: replay them on resume."""
        s = self.sessions.get(sid)
        if s is not None:
            s.delivered_seq = min(s.delivered_seq, first_unsent - 1)

    def restore(self, s: Session) -> None:
        """A session a predecessor broker handed over at a restart (supervisor/restart/state.py)."""
        s.worker.session = s
        self.sessions[s.sid] = s
        if s.key:
            self.by_key[s.key] = s
        self.on_change()

    def attach(self, client: Client, s: Session, now: float) -> None:
        """Attach a client; if nobody was watching, first deliver what it missed, in order."""
        if client.id in s.attached or client.id not in self.clients:
            return
        if not s.attached and s.replay:
            missed, truncated = s.since(s.delivered_seq)
            if truncated:
                client.send(jsonrpc.event("notification.show", s.sid, {
                    "kind": "warning", "text": "Some events were dropped while you were away; "
                    "the replay buffer was full. Reload the history for the full conversation."}))
            for data in missed:
                client.send(data)
            if missed:
                s.delivered_seq = s.replay[-1][0]
        s.attached.add(client.id)
        s.detached_at = None
        s.last_active = now
        self._watching[client.id].add(s.sid)
        self.on_change()

    def touch(self, s: Session, now: float) -> None:
        """Activity: a call routed to it, an event from it, a new worker state. Restarts a detached grace clock."""
        s.last_active = now

    def deliver(self, s: Session, seq: int, data: bytes, now: float) -> None:
        """An event from the session's worker: numbered, kept for replay, sent to everyone attached."""
        s.worker.seq = seq
        s.last_active = now
        self._fan_out(s, seq, data)

    def emit(self, s: Session, type_: str, payload: dict) -> None:
        """An event the broker itself emits for a session whose worker is gone (numbered after the worker's last)."""
        s.worker.seq += 1
        self._fan_out(s, s.worker.seq, jsonrpc.event(type_, s.sid, payload, s.worker.seq).encode())

    def _fan_out(self, s: Session, seq: int, data: bytes) -> None:
        s.remember(seq, data, self._replay_events(), self._replay_bytes())
        if s.attached:
            for cid in s.attached:
                client = self.clients.get(cid)
                if client is not None:
                    client.send(data)
            s.delivered_seq = seq  # or a later re-attach would replay it a second time

    def end(self, s: Session, reason: str) -> None:
        """The session's worker is gone: tell whoever still watches it why, then forget the session."""
        if reason in ("worker_exit", "heartbeat_lost"):
            self.emit(s, "error", {"message": f"the session's worker is gone ({reason})"})
        self.emit(s, "session.reclaimed", {"session_id": s.sid, "stored_session_id": s.key, "reason": reason})
        self.sessions.pop(s.sid, None)
        if self.by_key.get(s.key) is s:
            self.by_key.pop(s.key, None)
        for cid in s.attached:
            self._watching.get(cid, set()).discard(s.sid)
        self.on_change()

    # -- lookups ----------------------------------------------------------------
    def find(self, ident: str) -> Session | None:
        """A live session by runtime id or stored key."""
        return self.sessions.get(ident) or self.by_key.get(ident)

    def find_by_title(self, title: str) -> Session | None:
        for s in self.sessions.values():
            if title and s.worker.meta.get("title") == title:
                return s
        return None

    def live(self) -> Iterator[Session]:
        """Sessions whose worker is not stopping."""
        return (s for s in self.sessions.values() if not s.worker.stopping)

