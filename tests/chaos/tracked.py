"""A test client that remembers what the invariants need: ids sent, answers, sessions, prompts, completions."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from typing import Any

from tests.client import Client

_names = itertools.count(1)


class Tracked(Client):
    """Request ids are unique across all clients (`c7-3`), so a response sent to the wrong client shows."""

    def __init__(self, ws) -> None:
        super().__init__(ws)
        self.name = f"c{next(_names)}"
        self._ids = (f"{self.name}-{n}" for n in itertools.count(1))
        self.sent: list[str] = []
        self.answers: Counter = Counter()
        self.sids: set[str] = set()  # every session this client created, resumed or activated
        self.keys: dict[str, str] = {}  # runtime id -> stored key
        self.attached: set[str] = set()  # sessions it should be attached to right now
        self.prompts: list[tuple[str, str]] = []  # (stored key, text) of every prompt.submit that was answered

    @property
    def closed(self) -> bool:
        return self._reader.done()

    async def _dispatch(self, item: dict) -> None:
        if item.get("method") == "event":
            params = item.get("params") or {}
            if params.get("type") == "session.reclaimed":
                self.attached.discard(params.get("session_id", ""))
        else:
            self.answers[json.dumps(item.get("id"))] += 1
        await super()._dispatch(item)

    def _new_id(self) -> Any:
        rid = next(self._ids)
        self.sent.append(rid)
        return rid

    async def request(self, method: str, params: dict | None = None, timeout: float = 10) -> dict:
        resp = await super().request(method, params, timeout)
        self._note(method, params or {}, resp.get("result"))
        return resp

    def _note(self, method: str, params: dict, result: Any) -> None:
        if not isinstance(result, dict):
            return
        if method in ("session.create", "session.resume", "session.activate"):
            sid = result.get("session_id")
            if isinstance(sid, str) and sid:
                key = result.get("stored_session_id") or result.get("session_key") or result.get("resumed") or ""
                self.sids.add(sid)
                self.keys[sid] = key
                self.attached.add(sid)
        elif method == "prompt.submit":
            sid = params.get("session_id", "")
            self.prompts.append((self.keys.get(sid, ""), params.get("text", "")))
            self.attached.add(sid)

    def last_seq(self, sid: str) -> int:
        return max((e.get("seq", 0) for e in self.by_session.get(sid, [])), default=0)

    async def catch_up(self, sid: str, last_seen: int) -> int:
        """After a reconnect: fetch the events after `last_seen` (session.events.since), keep the new ones."""
        res = await self.call("session.events.since", {"session_id": sid, "last_seen": last_seen})
        have = {e.get("seq") for e in self.by_session.get(sid, [])}
        added = 0
        for ev in res["events"]:
            params = ev["params"] if "params" in ev else ev
            if params.get("seq") not in have:
                self.events.append(params)
                self.by_session[sid].append(params)
                added += 1
        return added

    def completes(self) -> list[tuple[str, str, str]]:
        """(stored key, text, status) of every message.complete this client received."""
        out = []
        for ev in self.events:
            if ev.get("type") == "message.complete":
                p = ev.get("payload") or {}
                out.append((self.keys.get(ev.get("session_id", ""), ""), p.get("text", ""), p.get("status", "")))
        return out

    def missing_answers(self) -> list[str]:
        """Ids that got no answer although the connection is still open, or more than one answer."""
        bad = []
        for rid in self.sent:
            n = self.answers.get(json.dumps(rid), 0)
            if n > 1 or (n == 0 and not self.closed):
                bad.append(f"{rid}:{n}")
        return bad

    def foreign_answers(self) -> list[str]:
        mine = {json.dumps(r) for r in self.sent}
        return [k for k in self.answers if k not in mine]

    def crossed_events(self) -> list[dict]:
        return [e for e in self.events if e.get("session_id", "") not in self.sids | {""}]
