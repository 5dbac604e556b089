"""A small JSON-RPC-over-WebSocket client for tests and benchmarks (what a TUI does, minus the screen)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import defaultdict
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


class RpcFailed(Exception):
    def __init__(self, error: dict) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.message = error.get("message")


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future] = {}
        self.events: list[dict] = []  # every event, in arrival order
        self.by_session: dict[str, list[dict]] = defaultdict(list)
        self.unmatched: list[Any] = []  # responses nobody waited for (should stay empty)
        self._event_cond = asyncio.Condition()
        self.ready: dict | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, **kwargs) -> "Client":
        ws = await connect(url, max_size=None, **kwargs)
        client = cls(ws)
        await client.wait_event(lambda e: e["type"] == "gateway.ready", timeout=5)
        return client

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                for item in msg if isinstance(msg, list) else [msg]:
                    await self._dispatch(item)
        except Exception:
            pass
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))
            async with self._event_cond:
                self._event_cond.notify_all()

    async def _dispatch(self, item: dict) -> None:
        if item.get("method") == "event":
            params = item["params"]
            if params["type"] == "gateway.ready":
                self.ready = params.get("payload", {})
            self.events.append(params)
            self.by_session[params.get("session_id", "")].append(params)
            async with self._event_cond:
                self._event_cond.notify_all()
            return
        fut = self._waiting.pop(item.get("id"), None)
        if fut is not None and not fut.done():
            fut.set_result(item)
        else:
            self.unmatched.append(item)

    def _new_id(self) -> Any:
        return next(self._ids)

    async def request(self, method: str, params: dict | None = None, timeout: float = 10) -> dict:
        """Send a call and return the whole response object (result or error)."""
        rid = self._new_id()
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        await self.ws.send(json.dumps(msg))
        return await asyncio.wait_for(fut, timeout)

    async def call(self, method: str, params: dict | None = None, timeout: float = 10) -> Any:
        resp = await self.request(method, params, timeout)
        if "error" in resp:
            raise RpcFailed(resp["error"])
        return resp["result"]

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def wait_event(self, pred, timeout: float = 10) -> dict:
        async def find() -> dict:
            seen = 0
            async with self._event_cond:
                while True:
                    for ev in self.events[seen:]:
                        if pred(ev):
                            return ev
                    seen = len(self.events)
                    if self._reader.done():
                        raise ConnectionError("connection closed while waiting for an event")
                    await self._event_cond.wait()

        return await asyncio.wait_for(find(), timeout)

    async def turn(self, sid: str, text: str, timeout: float = 10) -> dict:
        """Submit a prompt and wait for its message.complete; returns the complete event."""
        start = len(self.by_session[sid])
        await self.call("prompt.submit", {"session_id": sid, "text": text})
        return await self.wait_event(
            lambda e: e.get("session_id") == sid and e["type"] == "message.complete"
            and self.by_session[sid].index(e) >= start, timeout)

    async def create(self, **params) -> str:
        res = await self.call("session.create", params or {"cols": 80})
        return res["session_id"]

    def deltas(self, sid: str) -> str:
        return "".join(e.get("payload", {}).get("text", "") for e in self.by_session[sid]
                       if e["type"] == "message.delta")

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake (what a killed browser tab does)."""
        transport = self.ws.transport
        transport.abort()
        self._reader.cancel()
