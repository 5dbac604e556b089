"""Issue 2 acceptance 3: every JSON-RPC error path of protocol.md, against a real gateway and real workers.

Also: the connection checks (token, Host, Origin, frame size) that close a socket before any frame,
and 1,000 malformed frames on one connection while another client keeps working.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect

from tests.client import Client
from tests.conftest import kill_tree, pid_alive, run, start_gateway, wait_for

MAX_FRAME = 65536
MAX_BATCH = 8


@pytest.fixture(scope="module")
def gw():
    """One gateway for the stateless checks (each test leaves no session behind)."""
    tmp = Path(tempfile.mkdtemp(prefix="hg-", dir="/tmp"))
    g = start_gateway(tmp, "--max-frame", str(MAX_FRAME), "--max-batch", str(MAX_BATCH))
    yield g
    kill_tree(g)
    shutil.rmtree(tmp, ignore_errors=True)


class Raw:
    """A bare connection: raw frames out, decoded replies in (events are kept aside, not returned as replies)."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.events: list[dict] = []
        self.stray: list[Any] = []  # replies that arrived while only events were expected

    @classmethod
    async def open(cls, url: str, **kwargs) -> "Raw":
        ws = await connect(url, max_size=None, **kwargs)
        raw = cls(ws)
        first = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert first["method"] == "event" and first["params"]["type"] == "gateway.ready"
        return raw

    async def send(self, data: str | bytes | Any) -> None:
        await self.ws.send(data if isinstance(data, (str, bytes)) else json.dumps(data))

    async def reply(self, timeout: float = 10) -> Any:
        """The next message that is not an event."""
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
            if isinstance(msg, dict) and msg.get("method") == "event":
                self.events.append(msg["params"])
                continue
            return msg

    async def until_event(self, pred, timeout: float = 10) -> dict:
        async def find() -> dict:
            while True:
                msg = json.loads(await self.ws.recv())
                if isinstance(msg, dict) and msg.get("method") == "event":
                    self.events.append(msg["params"])
                    if pred(msg["params"]):
                        return msg["params"]
                else:
                    self.stray.append(msg)

        return await asyncio.wait_for(find(), timeout)

    async def ask(self, data: Any, timeout: float = 10) -> Any:
        await self.send(data)
        return await self.reply(timeout)

    async def close(self) -> None:
        await self.ws.close()


def req(method: str, params: Any = None, rid: Any = 1) -> dict:
    msg = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def assert_error(resp: dict, code: int, rid: Any) -> dict:
    assert resp.get("jsonrpc") == "2.0", resp
    assert "result" not in resp, resp
    assert resp["id"] == rid, resp
    assert resp["error"]["code"] == code, resp
    assert isinstance(resp["error"]["message"], str) and resp["error"]["message"], resp
    return resp["error"]


def with_raw(url: str, body, **kwargs):
    async def go():
        r = await Raw.open(url, **kwargs)
        try:
            return await body(r)
        finally:
            await r.close()

    return run(go())


# -- -32700 ---------------------------------------------------------------------
@pytest.mark.parametrize("text", ['{"jsonrpc":"2.0","id":1,"method":', "not json at all", "{'single': 'quotes'}",
                                  '{"jsonrpc":"2.0","id":1,"method":"gateway.ping"} trailing', "",
                                  "[" * 5000 + "]" * 5000],
                         ids=["truncated", "words", "single-quotes", "trailing", "empty", "too-deep"])
def test_parse_error(gw, text):
    async def body(r: Raw):
        assert_error(await r.ask(text), -32700, None)
        assert (await r.ask(req("gateway.ping", rid="after")))["result"] == {"ok": True}

    with_raw(gw.url, body)


def test_binary_frame_is_a_parse_error(gw):
    async def body(r: Raw):
        err = assert_error(await r.ask(json.dumps(req("gateway.ping")).encode()), -32700, None)
        assert "binary" in err["message"]
        assert (await r.ask(req("gateway.ping", rid=2)))["result"] == {"ok": True}

    with_raw(gw.url, body)


# -- -32600 ---------------------------------------------------------------------
@pytest.mark.parametrize("obj", [42, "a string", None, True, 1.5], ids=repr)
def test_not_an_object(gw, obj):
    async def body(r: Raw):
        assert_error(await r.ask(json.dumps(obj)), -32600, None)

    with_raw(gw.url, body)


@pytest.mark.parametrize("jsonrpc", ["1.0", 2.0, None, "missing"], ids=repr)
def test_bad_jsonrpc_member_keeps_the_id(gw, jsonrpc):
    msg = req("gateway.ping", rid="x-7")
    if jsonrpc == "missing":
        del msg["jsonrpc"]
    else:
        msg["jsonrpc"] = jsonrpc

    async def body(r: Raw):
        assert_error(await r.ask(msg), -32600, "x-7")

    with_raw(gw.url, body)


@pytest.mark.parametrize("method", ["missing", "", 17, None, ["gateway.ping"]], ids=repr)
def test_missing_or_bad_method(gw, method):
    msg: dict = {"jsonrpc": "2.0", "id": 5}
    if method != "missing":
        msg["method"] = method

    async def body(r: Raw):
        assert_error(await r.ask(msg), -32600, 5)

    with_raw(gw.url, body)


@pytest.mark.parametrize("rid", [{"a": 1}, [1], True, False, "x" * 300], ids=["object", "array", "true", "false", "long"])
def test_bad_id_type(gw, rid):
    async def body(r: Raw):
        assert_error(await r.ask(req("gateway.ping", rid=rid)), -32600, None)

    with_raw(gw.url, body)


@pytest.mark.parametrize("rid", ["abc", 0, -3, 12.5, None], ids=repr)
def test_valid_ids_come_back_exactly(gw, rid):
    async def body(r: Raw):
        resp = await r.ask(req("gateway.ping", rid=rid))
        assert resp == {"jsonrpc": "2.0", "id": rid, "result": {"ok": True}}

    with_raw(gw.url, body)


def test_empty_batch_is_one_invalid_request(gw):
    async def body(r: Raw):
        resp = await r.ask("[]")
        assert isinstance(resp, dict), "an empty batch answers one error object, not an array"
        assert_error(resp, -32600, None)

    with_raw(gw.url, body)


def test_batch_over_max_batch(gw):
    async def body(r: Raw):
        resp = await r.ask([req("gateway.ping", rid=i) for i in range(MAX_BATCH + 1)])
        assert isinstance(resp, dict)
        err = assert_error(resp, -32600, None)
        assert str(MAX_BATCH) in err["message"]
        full = await r.ask([req("gateway.ping", rid=i) for i in range(MAX_BATCH)])
        assert sorted(x["id"] for x in full) == list(range(MAX_BATCH))

    with_raw(gw.url, body)


# -- -32601 / -32602 --------------------------------------------------------------
def test_unknown_method_is_answered_by_the_lobby(gw):
    async def body(r: Raw):
        err = assert_error(await r.ask(req("no.such.method", {}, rid=9)), -32601, 9)
        assert err["message"] == "unknown method: no.such.method"

    with_raw(gw.url, body)


def test_unknown_session_method_is_answered_by_the_worker(gw):
    async def body(r: Raw):
        sid = (await r.ask(req("session.create", {"cols": 80}, rid="c")))["result"]["session_id"]
        try:
            # a dual method with a session_id goes to the session worker, which does not serve this key
            err = assert_error(await r.ask(req("complete.path", {"session_id": sid, "word": "/"}, rid=3)), -32601, 3)
            assert "complete.path" in err["message"]
        finally:
            await r.ask(req("session.close", {"session_id": sid}, rid="z"))

    with_raw(gw.url, body)


@pytest.mark.parametrize("params", [[1, 2], "text", 7, True], ids=repr)
def test_params_not_an_object(gw, params):
    async def body(r: Raw):
        assert_error(await r.ask(req("gateway.ping", params, rid=4)), -32602, 4)
        assert_error(await r.ask(req("commands.catalog", params, rid=5)), -32602, 5)

    with_raw(gw.url, body)


def test_null_or_missing_params_mean_empty(gw):
    async def body(r: Raw):
        assert (await r.ask({"jsonrpc": "2.0", "id": 1, "method": "gateway.ping", "params": None}))["result"]
        assert "pairs" in (await r.ask(req("commands.catalog", rid=2)))["result"]

    with_raw(gw.url, body)


# -- 4001 / 4006 --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt.submit", "session.history", "session.interrupt", "slash.exec",
                                    "session.activate", "session.events.since"])
def test_unknown_session(gw, method):
    async def body(r: Raw):
        err = assert_error(await r.ask(req(method, {"session_id": "deadbeef", "text": "x", "command": "/help"},
                                           rid=11)), 4001, 11)
        assert "deadbeef" in err["message"] or "not found" in err["message"]

    with_raw(gw.url, body)


@pytest.mark.parametrize("params", [{}, {"session_id": ""}, {"session_id": None}, {"session_id": 42},
                                    {"session_id": ["abc"]}], ids=repr)
def test_missing_session_id(gw, params):
    async def body(r: Raw):
        assert_error(await r.ask(req("prompt.submit", dict(params, text="hi"), rid=12)), 4006, 12)
        assert_error(await r.ask(req("session.history", params, rid=13)), 4006, 13)

    with_raw(gw.url, body)


# -- batches and notifications ------------------------------------------------------
def test_mixed_batch_answers_one_array_with_the_right_ids(gw):
    batch = [
        req("gateway.ping", rid="ok-1"),
        {"jsonrpc": "2.0", "method": "gateway.ping"},  # notification: no entry
        {"jsonrpc": "2.0", "id": "no-method"},
        req("no.such.thing", rid=77),
        req("prompt.submit", {"session_id": "deadbeef", "text": "x"}, rid="gone"),
        req("gateway.ping", [1], rid="bad-params"),
        42,
        req("commands.catalog", rid="catalog"),
    ]

    async def body(r: Raw):
        resp = await r.ask(batch)
        assert isinstance(resp, list) and len(resp) == 7, resp
        by_id: dict[Any, list[dict]] = {}
        for item in resp:
            by_id.setdefault(item["id"], []).append(item)
        assert by_id["ok-1"][0]["result"] == {"ok": True}
        assert_error(by_id["no-method"][0], -32600, "no-method")
        assert_error(by_id[77][0], -32601, 77)
        assert_error(by_id["gone"][0], 4001, "gone")
        assert_error(by_id["bad-params"][0], -32602, "bad-params")
        assert_error(by_id[None][0], -32600, None)
        assert "pairs" in by_id["catalog"][0]["result"]
        # nothing else comes: the next reply is the next request's
        assert (await r.ask(req("gateway.ping", rid="next")))["id"] == "next"

    with_raw(gw.url, body)


def test_batch_of_only_notifications_gets_nothing(gw):
    async def body(r: Raw):
        await r.send([{"jsonrpc": "2.0", "method": "gateway.ping"}, {"jsonrpc": "2.0", "method": "no.such"}])
        assert (await r.ask(req("gateway.ping", rid="after")))["id"] == "after"

    with_raw(gw.url, body)


def test_notifications_get_no_response(gw):
    async def body(r: Raw):
        sid = (await r.ask(req("session.create", {"cols": 80}, rid="c")))["result"]["session_id"]
        try:
            for note in ({"jsonrpc": "2.0", "method": "gateway.ping"},
                         {"jsonrpc": "2.0", "method": "no.such.method", "params": {}},
                         {"jsonrpc": "2.0", "method": "prompt.submit", "params": {"session_id": "deadbeef", "text": "x"}},
                         {"jsonrpc": "2.0", "method": "prompt.submit", "params": {"session_id": sid, "text": "quiet please"}}):
                await r.send(note)
            # the notified prompt still runs: wait for its end (only events may arrive meanwhile)
            done = await r.until_event(lambda e: e["type"] == "message.complete" and e["session_id"] == sid)
            assert done["payload"]["text"] == "quiet please"
            assert r.stray == [], f"a notification was answered: {r.stray}"
            hist = await r.ask(req("session.history", {"session_id": sid}, rid="h"))
            assert hist["id"] == "h", f"a notification was answered: {hist}"
            assert hist["result"]["count"] == 2
            assert (await r.ask(req("gateway.ping", rid="p")))["id"] == "p"
        finally:
            await r.ask(req("session.close", {"session_id": sid}, rid="z"))

    with_raw(gw.url, body)


# -- frame size ------------------------------------------------------------------
def test_frame_over_max_frame_closes_1009_and_logs(gw):
    async def body(r: Raw):
        # just under the bound is served
        pad = "x" * (MAX_FRAME - 200)
        assert (await r.ask(req("gateway.ping", {"pad": pad}, rid="big-ok")))["result"] == {"ok": True}
        await r.send(json.dumps(req("gateway.ping", {"pad": "x" * (MAX_FRAME + 10)})))
        with pytest.raises(websockets.ConnectionClosed) as info:
            await r.reply(10)
        return info.value

    closed = with_raw(gw.url, body)
    assert closed.rcvd is not None and closed.rcvd.code == 1009
    wait_for(lambda: "over the size limit" in gw.log(), 5, what="the 1009 log line")
    line = next(ln for ln in gw.log().splitlines() if "over the size limit" in ln)
    assert f"limit={MAX_FRAME}" in line
    # the gateway is fine
    with_raw(gw.url, lambda r: r.ask(req("gateway.ping")))


# -- connection checks: before any frame -------------------------------------------
async def _rejected(url: str, port: int, **kwargs) -> int:
    """Connect through a socket to the real port (the URL may name another host) and expect an HTTP refusal:
    the status code, before any upgrade (issue 14 finding 8: no 101 followed by a close)."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        with pytest.raises(websockets.InvalidStatus) as info:
            ws = await connect(url, sock=sock, max_size=None, **kwargs)
            await ws.close()
            pytest.fail("the upgrade was accepted")
        return info.value.response.status_code
    finally:
        sock.close()


def _url(gw, host: str | None = None, port: int | None = None, token: str | None = None) -> str:
    tok = gw.token if token is None else token
    return f"ws://{host or '127.0.0.1'}:{port or gw.port}/api/ws?token={tok}"


@pytest.mark.parametrize("token", ["wrong", "", "TOKEN+1"], ids=["wrong", "empty", "longer"])
def test_bad_token_is_refused_401_before_the_upgrade(gw, token):
    token = gw.token + "1" if token == "TOKEN+1" else token
    assert run(_rejected(_url(gw, token=token), gw.port)) == 401


def test_missing_token_is_refused_401(gw):
    assert run(_rejected(f"ws://127.0.0.1:{gw.port}/api/ws", gw.port)) == 401


@pytest.mark.parametrize("host", ["evil.example", "10.0.0.1", "localhost.evil.example"])
def test_host_not_loopback_is_refused_403(gw, host):
    assert run(_rejected(_url(gw, host=host), gw.port)) == 403


def test_host_with_wrong_port_is_refused_403(gw):
    assert run(_rejected(_url(gw, host="127.0.0.1", port=gw.port + 1 if gw.port < 65535 else 1), gw.port)) == 403
    assert run(_rejected(_url(gw, host="localhost", port=80), gw.port)) == 403


def test_host_check_comes_before_the_token(gw):
    assert run(_rejected(_url(gw, host="evil.example", token="wrong"), gw.port)) == 403


# finding 8: a loopback Origin on another port is another local web app (a notebook on :8888), not us
@pytest.mark.parametrize("origin", ["http://evil.example", "https://127.0.0.1.evil.example", "null",
                                    "file://", "chrome-extension://abc", "http://localhost:8888",
                                    "https://localhost", "http://127.0.0.1:{other}", "ws://127.0.0.1:{port}"])
def test_disallowed_origin_is_refused_403(gw, origin):
    origin = origin.format(port=gw.port, other=gw.port + 1 if gw.port < 65535 else 1)
    assert run(_rejected(_url(gw), gw.port, origin=origin)) == 403


@pytest.mark.parametrize("origin", ["http://localhost:{port}", "http://127.0.0.1:{port}",
                                    "http://[::1]:{port}"])
def test_loopback_origin_is_allowed(gw, origin):
    async def go():
        c = await Client.open(gw.url, origin=origin.format(port=gw.port))
        assert c.events[0]["type"] == "gateway.ready"
        assert await c.call("gateway.ping") == {"ok": True}
        await c.close()

    run(go())


def test_localhost_host_name_is_allowed(gw):
    async def go():
        sock = socket.create_connection(("127.0.0.1", gw.port))
        c = Client(await connect(_url(gw, host="localhost"), sock=sock, max_size=None))
        await c.wait_event(lambda e: e["type"] == "gateway.ready", 5)
        assert await c.call("gateway.ping") == {"ok": True}
        await c.close()

    run(go())


def test_configured_origin_is_allowed(gateway_factory):
    g = gateway_factory("--allowed-origins", "https://app.example, https://other.example")

    async def go():
        c = await Client.open(g.url, origin="https://app.example")
        assert await c.call("gateway.ping") == {"ok": True}
        await c.close()

    run(go())
    assert run(_rejected(_url(g), g.port, origin="https://app.example.evil")) == 403


# -- -32603: a crash in one handler answers that request only -----------------------
HUGE = 2 ** 70  # valid JSON, but no msgpack integer can carry it to a worker


def test_handler_crash_answers_32603_and_nothing_else(gateway):
    async def go():
        c = await Client.open(gateway.url)
        sid = await c.create()
        await asyncio.sleep(0.3)
        before = wait_for(lambda: len(gateway.workers()) == 3 and gateway.workers(), 10, what="lobby, session, spare")

        # in the broker: the call cannot be encoded for the worker
        for method, params in (("session.create", {"cols": HUGE}),
                               ("prompt.submit", {"session_id": sid, "text": "boom", "extra": HUGE}),
                               ("commands.catalog", {"n": HUGE})):
            resp = await c.request(method, params)
            assert resp["error"]["code"] == -32603, resp
        # in a worker: the lobby's path completion meets a NUL byte
        resp = await c.request("complete.path", {"word": "\x00/x"})
        assert resp["error"]["code"] == -32603, resp

        # nothing else is affected: the same connection, the session, the lobby and creates still work
        assert await c.call("gateway.ping") == {"ok": True}
        done = await c.turn(sid, "still alive here")
        assert done["payload"]["text"] == "still alive here"
        assert "pairs" in await c.call("commands.catalog")
        sid2 = await c.create()
        assert await c.call("session.close", {"session_id": sid2}) == {"closed": True}
        assert c.unmatched == []
        await c.close()
        return before

    before = run(go())
    # no worker was left claimed by the failed create: back to lobby + session + one spare
    after = wait_for(lambda: len(gateway.workers()) == len(before) and gateway.workers(), 10,
                     what="worker count back to lobby + session + spare")
    assert len(after) == 3
    assert "crashed" in gateway.log()


# -- acceptance 3: 1,000 malformed frames, a parallel client keeps working ----------
def _malformed(i: int) -> tuple[str | bytes, int]:
    """Frame i of the flood and the error code it must get."""
    kinds: list[tuple[str | bytes, int]] = [
        ('{"jsonrpc":"2.0","id":%d,"method":' % i, -32700),
        (b"\x00\x01\x02 binary %d" % i, -32700),
        (str(i), -32600),
        (json.dumps({"jsonrpc": "1.0", "id": i, "method": "gateway.ping"}), -32600),
        (json.dumps({"jsonrpc": "2.0", "id": i}), -32600),
        (json.dumps({"jsonrpc": "2.0", "id": {"n": i}, "method": "gateway.ping"}), -32600),
        ("[]", -32600),
        (json.dumps([req("gateway.ping", rid=j) for j in range(65)]), -32600),  # default --max-batch is 64
        (json.dumps(req("gateway.ping", [i], rid=i)), -32602),
        (json.dumps(req(f"no.such.method.{i}", rid=i)), -32601),
        (json.dumps(req("prompt.submit", {"session_id": "%08x" % i, "text": "x"}, rid=i)), 4001),
        (json.dumps(req("session.history", {}, rid=i)), 4006),
        (json.dumps(req("session.create", {"close_on_disconnect": "yes"}, rid=i)), -32602),
        ("[" * 3000 + "]" * 3000, -32700),
    ]
    return kinds[i % len(kinds)]


@pytest.mark.timeout(120)
def test_thousand_malformed_frames_while_another_client_works(gateway):
    n = 1000
    baseline = wait_for(lambda: len(gateway.workers()) == 2 and gateway.workers(), 10, what="lobby + spare")
    rounds_done = [0]

    async def flood() -> int:
        """Send at least n malformed frames, and keep going (paced) until the other client did 3 rounds."""
        r = await Raw.open(gateway.url)
        got: Counter = Counter()
        sent: list[int] = []

        async def read():
            while True:
                resp = await r.reply(30)
                assert isinstance(resp, dict), f"a malformed frame got an array: {str(resp)[:200]}"
                got[resp["error"]["code"]] += 1

        reader = asyncio.create_task(read())
        i = 0
        while i < n or rounds_done[0] < 3:
            frame, code = _malformed(i)
            await r.send(frame)
            sent.append(code)
            i += 1
            if i >= n:
                await asyncio.sleep(0.01)
        expected = Counter(sent)
        for _ in range(600):
            if got == expected or reader.done():
                break
            await asyncio.sleep(0.05)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        assert got == expected
        assert (await r.ask(req("gateway.ping", rid="end")))["id"] == "end"
        await r.close()
        return i

    async def worker_client(stop: asyncio.Event) -> int:
        c = await Client.open(gateway.url)
        while not stop.is_set():
            sid = await c.create()
            text = f"round {rounds_done[0]} of the parallel client"
            done = await c.turn(sid, text, timeout=20)
            assert done["payload"]["text"] == text and done["payload"]["status"] == "complete"
            assert c.deltas(sid) == text
            assert await c.call("session.close", {"session_id": sid}) == {"closed": True}
            rounds_done[0] += 1
        assert c.unmatched == []
        await c.close()
        return rounds_done[0]

    async def go():
        stop = asyncio.Event()
        parallel = asyncio.create_task(worker_client(stop))
        try:
            frames_sent = await flood()
        finally:
            stop.set()
        return frames_sent, await asyncio.wait_for(parallel, 60)

    frames_sent, rounds = run(go(), timeout=110)
    assert frames_sent >= n and rounds >= 3
    assert pid_alive(gateway.pid)
    after = wait_for(lambda: len(gateway.workers()) == len(baseline) and gateway.workers(), 15,
                     what="worker count back to the baseline")
    assert sorted(t.split()[1] for t in after.values()) == sorted(t.split()[1] for t in baseline.values())
    assert not gateway.session_workers()
    assert "Traceback" not in gateway.log() and "crashed" not in gateway.log()
