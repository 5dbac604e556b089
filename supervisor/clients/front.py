"""The front: one aiohttp server for the WebSocket JSON-RPC path and every HTTP route next to it.

aiohttp because the front will also proxy every method and WebSocket to Hermes'
dashboard (issue 12); the websockets server parses only GET. Routes live in a
table looked up at request time (`add_route`, `set_fallback`), so ops and the
dashboard proxy can register theirs after the server is up.

Each connection has its own bounded outbound buffer and writer task, so a slow
client never stalls the broker: once its buffer passes --client-buffer it is
closed (1008) and its sessions detach like any other disconnect.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
from collections import deque
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web

from protocol import jsonrpc
from protocol.jsonrpc import RpcError
from supervisor import log
from supervisor.broker.broker import Broker
from supervisor.config import Config
from supervisor.clients.gateway import Gateway

WS_PATH = "/api/ws"
CLOSE_BAD_TOKEN = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_SLOW = 1008
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
# How long a close handshake may take before the socket is dropped: a client that stopped
# answering must not hold its sessions attached for long after the ping found it.
CLOSE_TIMEOUT = 1.0

HttpRoute = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Conn:
    """One client connection: what it is attached to, and its outbound queue."""

    def __init__(self, ws: web.WebSocketResponse, cid: int, limit: int,
                 transport: asyncio.BaseTransport | None = None) -> None:
        self.id = cid
        self.ws = ws
        self.transport = transport
        self.attached: set[str] = set()
        self.closed = False
        self.capabilities: dict = {}
        self.limit = limit
        self._out: deque[str | bytes] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self.writer = asyncio.create_task(self._write(), name=f"ws-writer-{cid}")

    def send(self, data: str | bytes) -> None:
        if self.closed:
            return
        self._out.append(data)
        self._queued += len(data)
        if self._queued > self.limit:
            self.closed = True
            self._out.clear()
            log.warning("client too slow, disconnecting", conn=self.id, buffered=self._queued, limit=self.limit)
            asyncio.get_running_loop().create_task(self.ws.close(
                code=CLOSE_TOO_SLOW, message=f"client too slow: more than {self.limit} bytes unread".encode()))
            return
        self._wake.set()

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._out:
                    data = self._out.popleft()
                    self._queued -= len(data)
                    await self.ws.send_frame(data.encode() if isinstance(data, str) else data, WSMsgType.TEXT)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass  # closing or closed: the reader side ends the connection


class _Batch:
    """Collects the responses of one JSON-RPC batch and sends them as one array."""

    def __init__(self, conn: Conn, expected: int) -> None:
        self.conn = conn
        self.expected = expected
        self.parts: list[str] = []

    def sink(self, data: str | bytes) -> None:
        self.parts.append(data.decode() if isinstance(data, bytes) else data)
        if len(self.parts) == self.expected:
            self.conn.send("[" + ",".join(self.parts) + "]")


class Front:
    def __init__(self, cfg: Config, broker: Broker, gateway: Gateway, token: str) -> None:
        self.cfg = cfg
        self.broker = broker
        self.gateway = gateway
        self.token = token
        self.server: asyncio.Server | None = None
        self.runner: web.AppRunner | None = None
        self.port = cfg.port
        self.http_routes: dict[str, HttpRoute] = {}
        self.fallback: HttpRoute | None = None
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self.ready_payload: dict = {"skin": {}, "heartbeat": True}
        self.rejected: dict[str, int] = {}

    def add_route(self, path: str, handler: HttpRoute) -> None:
        """Serve `path` (any method) with `handler`; allowed before or after start()."""
        self.http_routes[path] = handler

    def set_fallback(self, handler: HttpRoute | None) -> None:
        """Serve every path without a route (the dashboard proxy); None: answer 404."""
        self.fallback = handler

    async def start(self) -> None:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._http)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self.runner.server, self.cfg.host, self.cfg.port,
                                               reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def close_all(self, code: int = 1001, reason: str = "gateway shutting down") -> None:
        async def close(conn: Conn) -> None:
            try:
                await asyncio.wait_for(conn.ws.close(code=code, message=reason.encode()), 1.0)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                transport.abort()  # no answer to the closing handshake: drop it

        # all at once: one stuck client per second, in turn, would blow the --stop-timeout + 1 s budget
        await asyncio.gather(*(close(c) for c in self._conns()))
        if self.server is not None:
            self.server.close()
        if self.runner is not None:
            try:
                await asyncio.wait_for(self.runner.cleanup(), 2.0)
            except asyncio.TimeoutError:
                pass

    def _conns(self) -> list[Conn]:
        return [c for c in self.broker.clients.values() if isinstance(c, Conn)]

    # -- HTTP stage -----------------------------------------------------------
    async def _http(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == WS_PATH:
            return await self._ws(request)
        route = self.http_routes.get(path)
        if route is not None:
            return await route(request)
        if self.fallback is not None:
            return await self.fallback(request)
        return web.Response(status=404, text=f"not found: {path[:100]} (the WebSocket is {WS_PATH})\n")

    def host_ok(self, host: str | None) -> bool:
        if not host:
            return False
        name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if not name:
            return False
        names = set(LOOPBACK_NAMES) | {self.cfg.host, f"[{self.cfg.host}]"}
        return name.lower() in names and port == str(self.port)

    def origin_ok(self, origin: str | None) -> bool:
        if origin is None:
            return True  # non-browser clients (the TUI) send none
        allowed = [o.strip() for o in self.cfg.allowed_origins.split(",") if o.strip()]
        if origin in allowed or "*" in allowed:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and (parts.hostname or "") in ("127.0.0.1", "localhost", "::1")

    def token_ok(self, supplied: str) -> bool:
        return hmac.compare_digest(supplied.encode(), self.token.encode())

    # -- WebSocket stage ------------------------------------------------------
    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            timeout=CLOSE_TIMEOUT, heartbeat=self.cfg.ws_ping_interval, max_msg_size=self.cfg.max_frame,
            compress=False, autoping=True)
        ws._pong_heartbeat = self.cfg.ws_ping_timeout  # aiohttp fixes it at heartbeat / 2; keep --ws-ping-timeout
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, headers={"Upgrade": "websocket"},
                                text=f"upgrade required: {WS_PATH} is a WebSocket endpoint\n")
        await ws.prepare(request)
        if not self.host_ok(request.headers.get("Host")) or not self.origin_ok(request.headers.get("Origin")):
            self.rejected["forbidden"] = self.rejected.get("forbidden", 0) + 1
            log.warning("rejected connection: host or origin not allowed", host=request.headers.get("Host"),
                        origin=request.headers.get("Origin"))
            await ws.close(code=CLOSE_FORBIDDEN, message=b"forbidden: Host must be a loopback name and Origin allowed")
            return ws
        if not self.token_ok(request.query.get("token", "")):
            self.rejected["token"] = self.rejected.get("token", 0) + 1
            log.warning("rejected connection: bad token", peer=str(request.remote))
            await ws.close(code=CLOSE_BAD_TOKEN, message=b"unauthorized: bad or missing token")
            return ws
        conn = Conn(ws, next(self._ids), self.cfg.client_buffer, request.transport)
        self.broker.clients[conn.id] = conn
        log.debug("client connected", conn=conn.id, peer=str(request.remote))
        conn.send(jsonrpc.event("gateway.ready", "", self.ready_payload))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self.on_text(conn, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    conn.send(jsonrpc.error(None, jsonrpc.PARSE_ERROR,
                                            "parse error: binary frames are not accepted, send JSON text"))
                elif msg.type == WSMsgType.ERROR:
                    if getattr(msg.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
                        log.warning("client sent a frame over the size limit; connection closed", conn=conn.id,
                                    limit=self.cfg.max_frame)
                    break
        finally:
            conn.closed = True
            self.broker.detach_client(conn)
            conn.writer.cancel()
            log.debug("client disconnected", conn=conn.id, code=ws.close_code)
        return ws

    def on_text(self, conn: Conn, text: str) -> None:
        try:
            obj = jsonrpc.parse_message(text)
        except RpcError as exc:
            conn.send(jsonrpc.error(None, exc.code, exc.message))
            return
        if isinstance(obj, list):
            if not obj:
                conn.send(jsonrpc.error(None, jsonrpc.INVALID_REQUEST, "invalid request: empty batch"))
                return
            if len(obj) > self.cfg.max_batch:
                conn.send(jsonrpc.error(None, jsonrpc.INVALID_REQUEST,
                                        f"invalid request: batch of {len(obj)} exceeds {self.cfg.max_batch}"))
                return
            checked = [self._check(item) for item in obj]
            batch = _Batch(conn, sum(1 for c in checked if not isinstance(c, jsonrpc.Request) or not c.is_notification))
            if batch.expected == 0:
                batch.expected = -1  # all notifications: nothing is sent back
            for c in checked:
                self._dispatch(conn, c, batch.sink)
            return
        self._one(conn, obj, conn.send)

    def _one(self, conn: Conn, obj: object, sink: Callable[[str | bytes], None]) -> None:
        self._dispatch(conn, self._check(obj), sink)

    @staticmethod
    def _check(obj: object) -> jsonrpc.Request | RpcError:
        try:
            return jsonrpc.validate(obj)
        except RpcError as exc:
            return exc

    def _dispatch(self, conn: Conn, checked: jsonrpc.Request | RpcError, sink: Callable[[str | bytes], None]) -> None:
        if isinstance(checked, RpcError):
            rid = checked.data.get("id") if isinstance(checked.data, dict) else None
            sink(jsonrpc.error(rid, checked.code, checked.message))
            return
        task = asyncio.get_running_loop().create_task(
            self.gateway.call(conn, checked, None if checked.is_notification else sink))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def url_for(host: str, port: int, token: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"ws://{shown}:{port}{WS_PATH}?token={token}"


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))
