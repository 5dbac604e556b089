"""The dashboard proxy against a small real aiohttp app: every method, WebSocket both ways, 502 with a reason."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from aiohttp import web

from supervisor.dashboard.proxy import DashboardProxy


async def _upstream() -> tuple[web.AppRunner, int]:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"method": request.method, "path": request.path_qs, "body": body.decode(),
                                  "host": request.headers.get("Host"), "origin": request.headers.get("Origin")},
                                 headers={"X-Up": "1"})

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "bye":
                await sock.close(code=4410, message=b"exited")
                break
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str("text:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(b"bin:" + msg.data)
        return sock

    app = web.Application()
    app.router.add_get("/api/pty", ws)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def _front(proxy: DashboardProxy) -> tuple[web.AppRunner, int]:
    app = web.Application()
    async def handler(request: web.Request) -> web.StreamResponse:
        return await proxy(request)

    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_method_and_websocket_reach_the_child():
    async def main():
        up, up_port = await _upstream()
        proxy = DashboardProxy(lambda: f"http://127.0.0.1:{up_port}", lambda: "unused", lambda: 9999)
        front, port = await _front(proxy)
        try:
            async with aiohttp.ClientSession() as s:
                for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                    async with s.request(method, f"http://127.0.0.1:{port}/api/x?a=1%202", data="payload",
                                         headers={"Origin": f"http://127.0.0.1:{port}"}) as r:
                        assert r.status == 200, method
                        got = await r.json()
                        assert r.headers["X-Up"] == "1"
                    assert got["method"] == method and got["path"] == "/api/x?a=1%202"
                    assert got["body"] == "payload"
                    # Hermes' own Host/Origin checks are bound to loopback: the proxy presents the gateway's port there
                    assert got["host"] == "127.0.0.1:9999" and got["origin"] == "http://127.0.0.1:9999"
                ws = await s.ws_connect(f"http://127.0.0.1:{port}/api/pty?attach=t")
                await ws.send_str("hi")
                assert (await ws.receive(timeout=5)).data == "text:hi"
                await ws.send_bytes(b"\x00\x01")
                assert (await ws.receive(timeout=5)).data == b"bin:\x00\x01"
                await ws.send_str("bye")
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4410  # the child's code reaches the tab
        finally:
            await proxy.close()
            await front.cleanup()
            await up.cleanup()

    asyncio.run(main())


def test_dead_or_restarting_child_answers_502_with_a_reason():
    async def main():
        dead = _free_port()
        state = {"base": None}
        proxy = DashboardProxy(lambda: state["base"], lambda: "dashboard restarting: the child exited with -9",
                               lambda: 9999)
        front, port = await _front(proxy)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/chat") as r:
                    assert r.status == 502
                    assert "dashboard restarting: the child exited with -9" in await r.text()
                state["base"] = f"http://127.0.0.1:{dead}"  # said to be up, but nothing listens
                for method in ("GET", "POST"):
                    async with s.request(method, f"http://127.0.0.1:{port}/api/status", data="x") as r:
                        text = await r.text()
                        assert r.status == 502 and "dashboard unreachable" in text and "Traceback" not in text
                try:
                    await s.ws_connect(f"http://127.0.0.1:{port}/api/pty")
                    raise AssertionError("a WebSocket to a dead child must be refused")
                except aiohttp.WSServerHandshakeError as exc:
                    assert exc.status == 502
        finally:
            await proxy.close()
            await front.cleanup()

    asyncio.run(main())


def test_a_reattached_chats_events_reach_the_refreshed_page():
    """Hermes' PTY publishes to the first page's channel forever; the refreshed page's feed must get them too."""
    async def main():
        subs: dict[str, list[web.WebSocketResponse]] = {}

        async def events(request: web.Request) -> web.WebSocketResponse:
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            subs.setdefault(request.query["channel"], []).append(sock)
            async for _ in sock:
                pass
            return sock

        async def pub(request: web.Request) -> web.WebSocketResponse:
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            async for msg in sock:
                for sub in subs.get(request.query["channel"], []):
                    await sub.send_str(msg.data)
            return sock

        async def pty(request: web.Request) -> web.WebSocketResponse:
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            async for _ in sock:
                pass
            return sock

        app = web.Application()
        app.router.add_get("/api/events", events)
        app.router.add_get("/api/pub", pub)
        app.router.add_get("/api/pty", pty)
        up = web.AppRunner(app)
        await up.setup()
        site = web.TCPSite(up, "127.0.0.1", 0)
        await site.start()
        up_port = site._server.sockets[0].getsockname()[1]
        proxy = DashboardProxy(lambda: f"http://127.0.0.1:{up_port}", lambda: "unused", lambda: 9999)
        front, port = await _front(proxy)
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as s:
                # first page: its PTY (attach token T) publishes to chat-1 for the rest of its life
                pty1 = await s.ws_connect(base + "/api/pty?channel=chat-1&attach=T")
                publisher = await s.ws_connect(base + "/api/pub?channel=chat-1")
                await pty1.close()
                # the refreshed page: a new channel, the same attach token
                feed = await s.ws_connect(base + "/api/events?channel=chat-2")
                pty2 = await s.ws_connect(base + "/api/pty?channel=chat-2&attach=T")
                await asyncio.sleep(0.2)
                await publisher.send_str('{"type":"message.delta"}')
                msg = await feed.receive(timeout=5)
                assert msg.data == '{"type":"message.delta"}'
                await pty2.close()
                await publisher.close()
                await feed.close()
        finally:
            await proxy.close()
            await front.cleanup()
            await up.cleanup()

    asyncio.run(main())
