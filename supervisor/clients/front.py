"""The WebSocket front: accept, check Host/Origin/token, parse JSON-RPC, and write to each client in order.

Each connection has its own bounded outbound buffer and writer task, so a slow
client never stalls the broker: once its buffer passes --client-buffer it is
closed (1008) and its sessions detach like any other disconnect.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import socket
import time
from collections import deque
from http import HTTPStatus
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

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
# How long a close handshake may take before the socket is dropped. websockets' default (10 s)
# would hold a client that stopped answering pings for 10 s more before its sessions detach.
CLOSE_TIMEOUT = 1.0

HttpRoute = Callable[[ServerConnection, Request], Awaitable[Response] | Response]


class Conn:
    """One client connection and its outbound queue (what it is attached to is the detach table's)."""

    def __init__(self, ws: ServerConnection, cid: int, limit: int) -> None:
        self.id = cid
        self.ws = ws
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
            asyncio.get_running_loop().create_task(
                self.ws.close(CLOSE_TOO_SLOW, f"client too slow: more than {self.limit} bytes unread"))
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
                    await self.ws.send(data, text=True)
        except (websockets.ConnectionClosed, asyncio.CancelledError):
            pass


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
        self.server: Server | None = None
        self.port = cfg.port
        self.http_routes: dict[str, HttpRoute] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self.ready_payload: dict = {"skin": {}, "heartbeat": True}
        self.rejected: dict[str, int] = {}

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on host:port, or on `sock` (a restart's successor takes its predecessor's listening socket)."""
        where = {"sock": sock} if sock is not None else {"host": self.cfg.host, "port": self.cfg.port}
        self.server = await serve(
            self._handle, **where,
            process_request=self._process_request,
            max_size=self.cfg.max_frame,
            max_queue=64,
            ping_interval=self.cfg.ws_ping_interval,
            ping_timeout=self.cfg.ws_ping_timeout,
            close_timeout=CLOSE_TIMEOUT,
            compression=None,
            server_header="hermes-gateway",
        )
        sock = next(iter(self.server.sockets))
        self.port = sock.getsockname()[1]

    def listening(self) -> list[socket.socket]:
        return list(self.server.sockets) if self.server is not None else []

    async def hand_over_clients(self, timeout: float = 1.0) -> dict[str, int]:
        """A restart's cut: let every client's queue drain (at most `timeout`), then close it with 1012.

        Returns, per session, the first event seq still unsent to some client when its connection was
        closed: the successor replays from there on resume, so a slow client loses nothing (it may get
        again what was in its socket at the cut) and a fast one gets nothing twice."""
        conns = self._conns()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(c._out for c in conns) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        unsent: dict[str, int] = {}
        for c in conns:
            for data in c._out:
                ref = _event_ref(data)
                if ref is not None and ref[1] < unsent.get(ref[0], 1 << 62):
                    unsent[ref[0]] = ref[1]
        await self.close_all(1012, "gateway restarting: reconnect and resume")
        return unsent

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close(close_connections=False)

    async def close_all(self, code: int = 1001, reason: str = "gateway shutting down") -> None:
        async def close(conn: Conn) -> None:
            try:
                await asyncio.wait_for(conn.ws.close(code, reason), 1.0)
            except (asyncio.TimeoutError, websockets.ConnectionClosed):
                conn.ws.transport.abort()  # no answer to the closing handshake: drop it

        # all at once: one stuck client per second, in turn, would blow the --stop-timeout + 1 s budget
        await asyncio.gather(*(close(c) for c in self._conns()))
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass

    def _conns(self) -> list[Conn]:
        return [c for c in self.broker.sessions.clients.values() if isinstance(c, Conn)]

    # -- HTTP stage -----------------------------------------------------------
    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        route = self.http_routes.get(path)
        if route is not None:
            result = route(connection, request)
            return await result if asyncio.iscoroutine(result) else result
        if path != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"not found: {path[:100]} (the WebSocket is {WS_PATH})\n")
        return None

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

    def token_ok(self, path: str) -> bool:
        supplied = parse_qs(urlsplit(path).query).get("token", [""])[0]
        return hmac.compare_digest(supplied.encode(), self.token.encode())

    # -- WebSocket stage ------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        req = ws.request
        assert req is not None
        if not self.host_ok(req.headers.get("Host")) or not self.origin_ok(req.headers.get("Origin")):
            self.rejected["forbidden"] = self.rejected.get("forbidden", 0) + 1
            log.warning("rejected connection: host or origin not allowed", host=req.headers.get("Host"),
                        origin=req.headers.get("Origin"))
            await ws.close(CLOSE_FORBIDDEN, "forbidden: Host must be a loopback name and Origin allowed")
            return
        if not self.token_ok(req.path):
            self.rejected["token"] = self.rejected.get("token", 0) + 1
            log.warning("rejected connection: bad token", peer=str(ws.remote_address))
            await ws.close(CLOSE_BAD_TOKEN, "unauthorized: bad or missing token")
            return
        conn = Conn(ws, next(self._ids), self.cfg.client_buffer)
        self.broker.sessions.connect(conn)
        log.debug("client connected", conn=conn.id, peer=str(ws.remote_address))
        conn.send(jsonrpc.event("gateway.ready", "", self.ready_payload))
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    conn.send(jsonrpc.error(None, jsonrpc.PARSE_ERROR,
                                            "parse error: binary frames are not accepted, send JSON text"))
                    continue
                self.on_text(conn, message)
        except websockets.ConnectionClosed:
            pass
        finally:
            conn.closed = True
            sent = ws.protocol.close_sent  # close_code is what the client sent back (1006 after a 1009 fail)
            if sent is not None and sent.code == 1009:
                log.warning("client sent a frame over the size limit; connection closed", conn=conn.id,
                            limit=self.cfg.max_frame)
            self.broker.sessions.disconnect(conn, time.monotonic())
            conn.writer.cancel()
            log.debug("client disconnected", conn=conn.id, code=ws.close_code)

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


def _event_ref(data: str | bytes) -> tuple[str, int] | None:
    """(session id, seq) of a queued event message, None for anything else."""
    try:
        obj = json.loads(data)
        params = obj["params"] if obj.get("method") == "event" else None
        return (str(params["session_id"]), int(params["seq"])) if params and "seq" in params else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def url_for(host: str, port: int, token: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"ws://{shown}:{port}{WS_PATH}?token={token}"


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))
