"""The front's fallback route: every method and WebSocket not the gateway's own goes to the dashboard child.

The gateway's Host, Origin and token checks have run before this handler; the
request reaches the child with a loopback Host (and Origin) so Hermes' own
DNS-rebinding checks, bound to loopback, accept it. A dead or restarting child
answers 502 with the reason, never a traceback.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import aiohttp
from aiohttp import WSMsgType, web

from supervisor import log

# hop-by-hop headers (RFC 9110 7.6.1) and those the client library sets itself
_DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
         "transfer-encoding", "upgrade", "host", "content-length"}
_WS_DROP = _DROP | {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                    "sec-websocket-protocol", "sec-websocket-accept"}
MAX_MSG = 4 * 1024 * 1024
MAX_CHATS = 1000  # attach tokens remembered for the channel follow-up below


class DashboardProxy:
    def __init__(self, base_url: Callable[[], str | None], unavailable: Callable[[], str],
                 public_port: Callable[[], int]) -> None:
        self.base_url = base_url
        self.unavailable = unavailable
        self.public_port = public_port
        self._session: aiohttp.ClientSession | None = None
        # A reattached PTY keeps publishing to the channel of the page that spawned it (a Hermes bug);
        # remember each attach token's first channel and the newest page's, and tee /api/pub there too.
        self._first: dict[str, str] = {}
        self._latest: dict[str, str] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=None))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _headers(self, request: web.Request, drop: set[str]) -> dict[str, str]:
        loopback = f"127.0.0.1:{self.public_port()}"
        out = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        out["Host"] = loopback
        if "Origin" in request.headers:
            out["Origin"] = f"http://{loopback}"
        return out

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        base = self.base_url()
        if base is None:
            return _bad_gateway(self.unavailable())
        url = base + request.rel_url.raw_path_qs
        if request.path == "/api/pty":
            self._note_chat(request.query.get("attach", ""), request.query.get("channel", ""))
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await self._ws(request, url)
            return await self._http(request, url)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            log.throttled("dashboard-proxy").warning("dashboard request failed", path=request.path[:100],
                                                     error=str(exc)[:200])
            return _bad_gateway(f"dashboard unreachable: {exc.__class__.__name__}: {str(exc)[:200]}"
                                if self.base_url() else self.unavailable())

    async def _http(self, request: web.Request, url: str) -> web.StreamResponse:
        body = request.content if request.body_exists else None
        async with self._client().request(request.method, url, headers=self._headers(request, _DROP),
                                          data=body, allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in _DROP:
                    resp.headers.add(k, v)
            if up.headers.get("Content-Length") is not None and request.method != "HEAD":
                resp.content_length = int(up.headers["Content-Length"])
            await resp.prepare(request)
            if request.method != "HEAD":
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def _ws(self, request: web.Request, url: str) -> web.StreamResponse:
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        up = await self._client().ws_connect(url, headers=self._headers(request, _WS_DROP), protocols=offered,
                                             autoping=True, max_msg_size=MAX_MSG)
        down = web.WebSocketResponse(protocols=[up.protocol] if up.protocol else (), max_msg_size=MAX_MSG,
                                     autoping=True)
        try:
            await down.prepare(request)
        except Exception:
            await up.close()
            raise
        if request.path == "/api/pub":
            to_child = asyncio.create_task(self._pump_pub(down, up, request))
        else:
            to_child = asyncio.create_task(_pump(down, up))
        to_browser = asyncio.create_task(_pump(up, down))
        try:
            await asyncio.wait({to_child, to_browser}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (to_child, to_browser):
                t.cancel()
            # the close code travels both ways (Hermes' PTY uses 4409 superseded, 4410 exited)
            code = up.close_code if up.closed and up.close_code else (down.close_code or 1000)
            await asyncio.gather(_close(up, down.close_code or 1000), _close(down, code), return_exceptions=True)
        return down

    def _note_chat(self, attach: str, channel: str) -> None:
        if not attach or not channel:
            return
        first = self._first.setdefault(attach, channel)
        if channel != first:
            self._latest[first] = channel
        while len(self._first) > MAX_CHATS:
            self._latest.pop(self._first.pop(next(iter(self._first))), None)

    async def _pump_pub(self, down: web.WebSocketResponse, up, request: web.Request) -> None:
        """The PTY's events go to its own channel and to the newest page that reattached to it."""
        channel = request.query.get("channel", "")
        extra: dict[str, aiohttp.ClientWebSocketResponse] = {}
        try:
            async for msg in down:
                if msg.type != WSMsgType.TEXT:
                    break
                await up.send_str(msg.data)
                latest = self._latest.get(channel)
                if latest is None:
                    continue
                ws = extra.get(latest)
                if ws is None or ws.closed:
                    base = self.base_url()
                    if base is None:
                        continue
                    query = {**request.query, "channel": latest}
                    try:
                        ws = await self._client().ws_connect(
                            base + str(request.rel_url.with_query(query)),
                            headers=self._headers(request, _WS_DROP), max_msg_size=MAX_MSG)
                    except (aiohttp.ClientError, OSError):
                        continue
                    extra[latest] = ws
                await ws.send_str(msg.data)
        finally:
            for ws in extra.values():
                await ws.close()


async def _pump(src, dst) -> None:
    async for msg in src:
        if msg.type == WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        else:
            break


async def _close(ws, code: int) -> None:
    if not ws.closed:
        await asyncio.wait_for(ws.close(code=code if 1000 <= code < 5000 and code not in (1005, 1006) else 1000), 1.0)


def _bad_gateway(reason: str) -> web.Response:
    return web.Response(status=502, text=f"bad gateway: {reason}\n")
