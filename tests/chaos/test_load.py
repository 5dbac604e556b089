"""Load faults: 100 clients at once, a slow consumer that never reads, a reconnect storm.

The slow consumer is a WebSocket client on a bare socket with a 4 KiB receive buffer that
stops reading: the gateway must close it with 1008 once its outbound buffer passes
--client-buffer, keep its own memory bounded meanwhile, and detach its session normally.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import sqlite3
import socket
import time

import psutil
import pytest

from tests.chaos.invariants import MiB, Checker, Tally, gather_limited
from tests.chaos.tracked import Tracked
from tests.conftest import run

CLIENT_BUFFER = 256 * 1024
WARM_POOL = 4
FLAGS = ("--max-workers", "120", "--warm-pool", str(WARM_POOL), "--reap-grace", "1", "--list-grace", "0.5",
         "--client-buffer", str(CLIENT_BUFFER))


@pytest.fixture(scope="module")
def gw(rig):
    return rig.start(*FLAGS, name="load")


# -- 100 clients at once ------------------------------------------------------------------------
async def _one_client(gw, i: int, tally: Tally) -> Tracked:
    c = await Tracked.open(gw.url, open_timeout=30)
    sid = (await c.call("session.create", {"cols": 80}, timeout=30))["session_id"]
    text = " ".join(f"c{i}w{j}" for j in range(40))
    done = await c.turn(sid, text, timeout=30)
    tally.ok(done["payload"]["text"] == text and c.deltas(sid) == text, f"client {i} got a wrong stream")
    return c


def _crowd(rig, gw, tally: Tally, clients: int, cycles: int, warmup: int = 0) -> None:
    """`cycles` crowds; the broker's RSS after the first `warmup` of them is the ceiling (+2 MiB) for the rest
    (measured: RSS climbs for ~4 crowds of 100 as the allocator settles, then stays within a few hundred KiB)."""
    chk = Checker(gw, tally, warm_pool=WARM_POOL)

    async def go():
        await chk.processes(set())
        base = await chk.baseline()
        warm_rss = None
        for cycle in range(cycles):
            t0 = time.monotonic()
            crowd = await asyncio.gather(*(_one_client(gw, i, tally) for i in range(clients)))
            took = time.monotonic() - t0
            tally.notes.append(f"{clients} clients connected, created and streamed in {took:.1f}s")
            tally.faults += clients
            live = await Tracked.open(gw.url)
            await chk.active_list(crowd, live)
            await live.close()
            chk.wire(crowd)
            chk.store(crowd)
            await gather_limited((c.close() for c in crowd), 50)
            await chk.processes(set(), timeout=30)
            await chk.back_to(base, warm_rss, timeout=15)
            if cycle == warmup - 1:
                warm_rss = chk.resources().rss
            tally.cycles += 1
        if warm_rss is not None:
            tally.notes.append(f"broker RSS after {warmup} warm-up crowds {warm_rss / MiB:.1f} MiB, "
                               f"after {cycles} {chk.resources().rss / MiB:.1f} MiB")
        await chk.finish([], None, base, warm_rss)

    run(go(), timeout=60 + 60 * cycles)


@pytest.mark.timeout(120)
def test_hundred_clients(rig, gw, tally):
    _crowd(rig, gw, tally, clients=100, cycles=1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hundred_clients_long(rig, gw, tally):
    _crowd(rig, gw, tally, clients=100, cycles=8, warmup=4)


# -- a slow consumer ----------------------------------------------------------------------------
class RawWs:
    """A WebSocket client on a bare socket with a 4 KiB receive buffer: it reads only when asked to,
    and then as fast as the kernel gives bytes (frames are skipped by their headers, not decoded)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, gw) -> "RawWs":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fixed and small: no autotuning
        sock.setblocking(False)
        ws = cls(sock)
        await ws.loop.sock_connect(sock, ("127.0.0.1", gw.port))
        path = gw.url.split(f":{gw.port}", 1)[1]
        key = base64.b64encode(os.urandom(16)).decode()
        await ws.loop.sock_sendall(sock, (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in ws.buf:
            ws.buf += await ws._recv()
        head, ws.buf = ws.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        return ws

    async def _recv(self) -> bytes:
        data = await self.loop.sock_recv(self.sock, 1 << 20)
        if not data:
            raise ConnectionError("closed by the gateway")
        return data

    async def send_text(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        mask = os.urandom(4)
        masked = (int.from_bytes(data, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
        if n < 126:
            head = bytes([0x81, 0x80 | n])
        elif n < 65536:
            head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
        await self.loop.sock_sendall(self.sock, head + mask + masked)

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the gateway (server frames are not masked)."""
        while True:
            if len(self.buf) >= 2:
                n, off = self.buf[1] & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, off = int.from_bytes(self.buf[2:4], "big"), 4
                elif n == 127 and len(self.buf) >= 10:
                    n, off = int.from_bytes(self.buf[2:10], "big"), 10
                if (self.buf[1] & 0x7F) < 126 or off > 2:
                    if len(self.buf) >= off + n:
                        op, payload, self.buf = self.buf[0] & 0x0F, self.buf[off:off + n], self.buf[off + n:]
                        return op, payload
            self.buf += await self._recv()

    async def call(self, rid: str, method: str, params: dict) -> dict:
        await self.send_text(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}))
        while True:
            op, payload = await self.frame()
            if op == 1 and json.loads(payload).get("id") == rid:
                return json.loads(payload)

    async def close_code(self) -> int | None:
        """Read everything up to the gateway's close frame; its code (None if the connection just ended)."""
        try:
            while True:
                op, payload = await self.frame()
                if op == 8:
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        except (ConnectionError, OSError):
            return None

    def close(self) -> None:
        self.sock.close()


def _slow(rig, gw, tally: Tally, words: int, cycles: int) -> None:
    chk = Checker(gw, tally, warm_pool=WARM_POOL)

    async def go():
        await chk.processes(set())
        base = await chk.baseline()
        observer = await Tracked.open(gw.url)
        keys: list[str] = []
        for cycle in range(cycles):
            log_mark = gw.log().count("client too slow")
            ws = await RawWs.open(gw)
            res = await ws.call("s1", "session.create", {"cols": 80})
            sid = res["result"]["session_id"]
            keys.append(res["result"]["stored_session_id"])
            rss0 = chk.resources().rss
            text = " ".join(f"w{j}" for j in range(words))  # ~ 90 bytes of JSON per word on the wire
            res = await ws.call("s2", "prompt.submit", {"session_id": sid, "text": text})
            tally.ok(res.get("result", {}).get("status") == "streaming", f"prompt not accepted: {res}")
            tally.faults += 1
            # from here on the client reads nothing; the gateway must give up on it
            peak = [rss0]

            async def sample() -> None:  # the broker's RSS, until the turn is over and the session reaped
                while True:
                    peak[0] = max(peak[0], chk.resources().rss)
                    await asyncio.sleep(0.02)

            sampler = asyncio.create_task(sample())
            t0 = time.monotonic()
            while gw.log().count("client too slow") == log_mark and time.monotonic() - t0 < 60:
                await asyncio.sleep(0.02)
            tally.ok(gw.log().count("client too slow") > log_mark, "a client that never reads was not disconnected")
            cut_after = time.monotonic() - t0
            # it reads again: what was in flight, then the close frame with 1008
            t_read = time.monotonic()
            code = await asyncio.wait_for(ws.close_code(), 15)
            ws.close()
            drained = time.monotonic() - t_read  # the gateway waits 1 s for the close handshake, then drops
            tally.ok(code == 1008, f"the slow client was closed with {code}, not 1008 (drained in {drained:.2f}s)")
            row: dict = {}
            for _ in range(100):  # detached once the gateway's side of the connection is done (<= 1 s close wait)
                rows = (await observer.call("session.active_list", {"current_session_id": sid}))["sessions"]
                row = next(r for r in rows if r["id"] == sid)
                if not row["attached"]:
                    break
                await asyncio.sleep(0.05)
            tally.ok(not row["attached"], f"the slow client's session is still attached: {row}")
            # the session finishes its turn detached, is reaped, and its reply is in the store
            await chk.processes(set(), timeout=60)
            sampler.cancel()
            growth = peak[0] - rss0
            tally.ok(growth < 16 * MiB, f"broker RSS grew {growth / MiB:.1f} MiB for one slow client")
            tally.notes.append(f"cut after {cut_after:.2f}s, read to the close in {drained:.2f}s, peak broker "
                               f"growth {growth / MiB:.1f} MiB for a {words * 90 / MiB:.0f} MiB stream")
            tally.cycles += 1
        await chk.finish([], observer, base)
        for key in keys:
            tally.ok(_stored_reply(gw, key, words), f"the detached turn's reply is not in the store ({key})")

    run(go(), timeout=90 + 60 * cycles)


def _stored_reply(gw, key: str, words: int) -> bool:
    con = sqlite3.connect(f"file:{gw.data_dir / 'sessions.db'}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT length(text), status FROM messages WHERE role='assistant' AND session_key=? "
                          "ORDER BY id DESC LIMIT 1", (key,)).fetchone()
    finally:
        con.close()
    return row is not None and row[1] == "complete" and row[0] >= words * 2


@pytest.mark.timeout(120)
def test_slow_consumer(rig, gw, tally):
    _slow(rig, gw, tally, words=60_000, cycles=1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slow_consumer_long(rig, gw, tally):
    _slow(rig, gw, tally, words=150_000, cycles=4)


# -- a reconnect storm --------------------------------------------------------------------------
async def _stormer(gw, n: int, until: float, clients: list[Tracked], tally: Tally) -> None:
    key = ""
    backoff = 0.1
    k = 0
    while time.monotonic() < until:
        try:
            c = await Tracked.open(gw.url)
        except OSError:
            await asyncio.sleep(backoff)
            continue
        clients.append(c)
        k += 1
        if not key:
            res = await c.call("session.create", {"cols": 80}, timeout=20)
            key = c.keys[res["session_id"]]
        else:
            res = await c.call("session.resume", {"session_id": key}, timeout=20)
        sid = res["session_id"]
        if k % 3 == 0:
            await c.turn(sid, f"storm {n} round {k}", timeout=20)
        elif k % 3 == 1:
            await c.call("prompt.submit", {"session_id": sid, "text": f"storm {n} dropped {k}"}, timeout=20)
        if k % 2:
            c.abort()
        else:
            await c.close()
        tally.faults += 1
        await asyncio.sleep(backoff * random.uniform(0.8, 1.2))


def _storm(rig, gw, tally: Tally, clients_n: int, seconds: float, warmup: float) -> None:
    """A warm-up storm, then the measured one; the broker's RSS after the warm-up (+2 MiB) is the ceiling
    (measured: with 20 clients RSS climbs for ~15 s of storm, then stays within ~0.2 MiB)."""
    chk = Checker(gw, tally, warm_pool=WARM_POOL)

    async def go():
        await chk.processes(set())
        base = await chk.baseline()
        warm: list[Tracked] = []
        await asyncio.gather(*(_stormer(gw, i, time.monotonic() + warmup, warm, tally) for i in range(clients_n)))
        await chk.processes(set(), timeout=30)
        await chk.back_to(base)
        warm_rss = chk.resources().rss
        observer = await Tracked.open(gw.url)
        clients: list[Tracked] = []
        worst = [0]

        async def watch() -> None:  # one worker per stored key at all times
            while True:
                c = chk.census()
                keys = []
                for p in c.sessions.values():
                    try:
                        keys.append(psutil.Process(p).cmdline()[0].split("key=")[-1])
                    except psutil.Error:
                        pass  # reaped since the census: not a second worker
                worst[0] = max(worst[0], len(keys) - len(set(keys)))
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch())
        until = time.monotonic() + seconds
        await asyncio.gather(*(_stormer(gw, i, until, clients, tally) for i in range(clients_n)))
        watcher.cancel()
        try:
            await watcher  # a watcher that died early would have stopped checking: surface why
        except asyncio.CancelledError:
            pass
        tally.ok(worst[0] == 0, f"a stored key had {worst[0] + 1} workers at once")
        tally.cycles = len(clients)
        tally.notes.append(f"{len(clients)} connections in {seconds:.0f}s by {clients_n} clients")
        await chk.finish(warm + clients, observer, base, warm_rss)

    run(go(), timeout=120 + seconds * 2)


@pytest.mark.timeout(120)
def test_reconnect_storm(rig, gw, tally):
    _storm(rig, gw, tally, clients_n=10, seconds=5, warmup=3)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reconnect_storm_long(rig, gw, tally):
    _storm(rig, gw, tally, clients_n=20, seconds=30, warmup=15)
