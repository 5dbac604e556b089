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
import itertools
import json
import socket
import time
from collections import deque
from typing import Awaitable, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from protocol import jsonrpc
from protocol.jsonrpc import RpcError
from supervisor import log
from supervisor.broker.broker import Broker
from supervisor.config import Config
from supervisor.clients.access import Access
from supervisor.clients.admission import Admission, Limits, raise_nofile
from supervisor.clients.exposure import tls_context
from supervisor.clients.gateway import Gateway

WS_PATH = "/api/ws"
CLOSE_TOO_SLOW = 1008
# How long a close handshake may take before the socket is dropped: a client that stopped
# answering must not hold its sessions attached for long after the ping found it.
CLOSE_TIMEOUT = 1.0

HttpRoute = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Conn:
    """One client connection and its outbound queue (what it is attached to is the detach table's)."""

    def __init__(self, ws: web.WebSocketResponse, cid: int, limit: int,
                 transport: asyncio.BaseTransport | None = None) -> None:
        self.id = cid
        self.ws = ws
        self.transport = transport
        self.inflight = 0  # requests dispatched and not answered yet (--max-inflight)
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
        self.runner: web.AppRunner | None = None
        self.port = cfg.port
        self.http_routes: dict[str, HttpRoute] = {}
        self.fallback: HttpRoute | None = None
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self.ready_payload: dict = {"skin": {}, "heartbeat": True}
        self.rejected: dict[str, int] = {}
        raise_nofile()  # before the broker's sockets exist: every descriptor counts
        self.tls = tls_context(cfg) if cfg.tls_cert else None
        self.access = Access(cfg.host, cfg.allowed_hosts, cfg.allowed_origins, tls=self.tls is not None)
        self.admission: Admission | None = None

    def add_route(self, path: str, handler: HttpRoute) -> None:
        """Serve `path` (any method) with `handler`; allowed before or after start()."""
        self.http_routes[path] = handler

    def set_fallback(self, handler: HttpRoute | None) -> None:
        """Serve every path without a route (the dashboard proxy); None: answer 404."""
        self.fallback = handler

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on host:port, or on `sock` (a restart's successor takes its predecessor's listening socket)."""
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_route("*", "/{tail:[\\s\\S]*}", self._http)  # any path, newlines too
        # an idle keep-alive connection is closed as fast as an unfinished handshake
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                    keepalive_timeout=self.cfg.handshake_timeout)
        await self.runner.setup()
        cfg = self.cfg
        self.admission = Admission(
            Limits(cfg.max_clients, cfg.max_handshakes, cfg.handshake_timeout), self.runner.server,
            workers_free=lambda: cfg.max_workers + cfg.warm_pool + 1 - len(self.broker.workers), ssl_ctx=self.tls,
            on_refused=self._count_refused)
        self.admission.listen([sock] if sock is not None else _listen(cfg.host, cfg.port))
        self.port = self.admission.socks[0].getsockname()[1]
        self.access.port = self.port
        room = self.admission.fd_room()
        if room < 8:
            log.error("few descriptors left for clients: raise RLIMIT_NOFILE or lower --max-workers",
                      room=room, soft_limit=self.admission.soft, max_workers=cfg.max_workers)

    def _count_refused(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def listening(self) -> list[socket.socket]:
        return list(self.admission.socks) if self.admission is not None else []

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
        if self.admission is not None:
            self.admission.close()

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
        if self.admission is not None:
            self.admission.close()
        if self.runner is not None:
            try:
                await asyncio.wait_for(self.runner.cleanup(), 2.0)
            except asyncio.TimeoutError:
                pass

    def _conns(self) -> list[Conn]:
        return [c for c in self.broker.sessions.clients.values() if isinstance(c, Conn)]

    # -- HTTP stage -----------------------------------------------------------
    async def _http(self, request: web.Request) -> web.StreamResponse:
        """Every request: Host and Origin first (DNS rebinding, other pages), then its route."""
        if self.admission is not None:
            self.admission.handshake_done(request.transport)
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if not self.access.host_ok(host):
            return self._refuse(request, 403, "host", f"forbidden: Host {host!r} is not a name of this gateway")
        if not self.access.origin_ok(origin, host):
            return self._refuse(request, 403, "origin", f"forbidden: Origin {origin!r} is not allowed "
                                "(same host and port as the gateway, or --allowed-origins)")
        path = request.path
        if path == WS_PATH:
            return await self._ws(request)
        route = self.http_routes.get(path)
        if route is not None:
            return await route(request)
        if self.fallback is not None:
            return await self.fallback(request)
        return web.Response(status=404, text=f"not found: {path[:100]} (the WebSocket is {WS_PATH})\n")

    def _refuse(self, request: web.Request, status: int, reason: str, text: str) -> web.Response:
        """A plain HTTP refusal before any upgrade; counted, and logged at most 10 times per 10 s."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        log.throttled("refused").warning("request refused", reason=reason, status=status, path=request.path[:100],
                                         peer=str(request.remote), host=request.headers.get("Host"),
                                         origin=request.headers.get("Origin"))
        headers = {"WWW-Authenticate": 'Bearer realm="hermes-gateway"'} if status == 401 else {}
        return web.Response(status=status, text=text + "\n", headers=headers)

    # -- WebSocket stage ------------------------------------------------------
    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            timeout=CLOSE_TIMEOUT, heartbeat=self.cfg.ws_ping_interval, max_msg_size=self.cfg.max_frame,
            compress=False, autoping=True)
        ws._pong_heartbeat = self.cfg.ws_ping_timeout  # aiohttp fixes it at heartbeat / 2; keep --ws-ping-timeout
        if not self.access.token_ok(request.query.get("token", ""), self.token):
            return self._refuse(request, 401, "token", "unauthorized: bad or missing token (?token=)")
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, headers={"Upgrade": "websocket"},
                                text=f"upgrade required: {WS_PATH} is a WebSocket endpoint\n")
        if len(self._conns()) >= self.cfg.max_clients:
            return self._refuse(request, 503, "max_clients", f"too many clients: {self.cfg.max_clients} "
                                "are connected (--max-clients)")
        await ws.prepare(request)
        conn = Conn(ws, next(self._ids), self.cfg.client_buffer, request.transport)
        self.broker.sessions.connect(conn)
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
            self.broker.sessions.disconnect(conn, time.monotonic())
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
        if conn.inflight >= self.cfg.max_inflight:
            self.rejected["max_inflight"] = self.rejected.get("max_inflight", 0) + 1
            log.throttled("inflight").warning("request refused: too many in flight", conn=conn.id,
                                              limit=self.cfg.max_inflight)
            if not checked.is_notification:
                sink(jsonrpc.error(checked.id, jsonrpc.TOO_MANY_IN_FLIGHT,
                                   f"too many requests in flight: {self.cfg.max_inflight} unanswered on this "
                                   "connection (--max-inflight); wait for answers, then retry"))
            return
        conn.inflight += 1
        answer = None if checked.is_notification else _Answer(conn, sink)
        task = asyncio.get_running_loop().create_task(self.gateway.call(conn, checked, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if answer is None:  # a notification is in flight while its handler runs
            task.add_done_callback(lambda _t, c=conn: setattr(c, "inflight", c.inflight - 1))


class _Answer:
    """The sink of one request: the request stops counting as in flight when its answer is sent
    (routed calls are answered later by the worker, long after the handler task ended)."""

    __slots__ = ("conn", "sink", "done")

    def __init__(self, conn: Conn, sink: Callable[[str | bytes], None]) -> None:
        self.conn, self.sink, self.done = conn, sink, False

    def __call__(self, data: str | bytes) -> None:
        if not self.done:
            self.done = True
            self.conn.inflight -= 1
        self.sink(data)


def _event_ref(data: str | bytes) -> tuple[str, int] | None:
    """(session id, seq) of a queued event message, None for anything else."""
    try:
        obj = json.loads(data)
        params = obj["params"] if obj.get("method") == "event" else None
        return (str(params["session_id"]), int(params["seq"])) if params and "seq" in params else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def url_for(host: str, port: int, token: str, tls: bool = False) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'wss' if tls else 'ws'}://{shown}:{port}{WS_PATH}?token={token}"


def _listen(host: str, port: int) -> list[socket.socket]:
    """The front's listening sockets (every address `host` resolves to), non-blocking, accepted by Admission."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in infos:
            s = socket.socket(family, type_, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr[0], port, *addr[2:]))  # port 0: the first address picks, the others follow it
            s.listen(1024)
            port = s.getsockname()[1]
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))
