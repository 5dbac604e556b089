"""Descriptor flood (issue 14 finding 1): under a tight RLIMIT_NOFILE, idle connections, slow handshakes and
bad tokens arrive while real clients stream turns. The gateway must keep serving them, never log EMFILE,
let a new client in as soon as the flood ends, and leave the usual invariants true (no leaked process,
hermes-ps agrees, a fresh client is served). During the flood a new client waits: with ~2 descriptors to
spare, the front can only take connections as fast as it can drop idle ones (docs/security.md)."""

from __future__ import annotations

import asyncio
import resource
import socket
import time

import pytest

from tests.chaos.invariants import Checker, Tally
from tests.chaos.tracked import Tracked
from tests.conftest import run

NOFILE = 48
FLAGS = ("--max-workers", "4", "--warm-pool", "1", "--handshake-timeout", "1", "--reap-grace", "1",
         "--list-grace", "0.5", "--echo-delay", "0.005")
TEXT = " ".join(f"d{i}" for i in range(200))


def _tight() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture(scope="module")
def gw(rig):
    return rig.start(*FLAGS, name="fds", preexec=_tight)


async def _flood(port: int, seconds: float, held: list[socket.socket], stats: dict) -> None:
    """Idle connections (never a byte), half a request head, and bad-token upgrades, for `seconds`."""
    loop = asyncio.get_running_loop()
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        s = socket.socket()
        s.setblocking(False)
        try:
            await loop.sock_connect(s, ("127.0.0.1", port))
            if i % 3 == 1:
                await loop.sock_sendall(s, b"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1")  # never finished
            elif i % 3 == 2:
                await loop.sock_sendall(s, (f"GET /api/ws?token=wrong HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
            held.append(s)
            stats["opened"] = stats.get("opened", 0) + 1
        except OSError:
            s.close()
            stats["refused"] = stats.get("refused", 0) + 1
        await asyncio.sleep(0.01)


@pytest.mark.timeout(120)
def test_descriptor_flood(rig, gw, tally: Tally):
    chk = Checker(gw, tally)

    async def go():
        await chk.processes(set())
        clients = [await Tracked.open(gw.url) for _ in range(3)]
        sids = [await c.create() for c in clients]
        held: list[socket.socket] = []
        stats: dict = {}
        flood = asyncio.ensure_future(_flood(gw.port, 4.0, held, stats))
        try:
            for rnd in range(3):
                done = await asyncio.gather(*(c.turn(sid, TEXT, timeout=30) for c, sid in zip(clients, sids)))
                for c, sid, d in zip(clients, sids, done):
                    tally.ok(d["payload"]["status"] == "complete" and c.deltas(sid).endswith(TEXT),
                             f"round {rnd}: a stream broke during the flood")
            await flood
        finally:
            flood.cancel()
            for s in held:
                s.close()
        # the backlog the flood left is drained at once (each closed socket reads EOF), and a new client gets in
        t0 = time.monotonic()
        late = await Tracked.open(gw.url, open_timeout=15)
        await late.call("gateway.ping", timeout=10)
        took = time.monotonic() - t0
        tally.recovered(took)
        tally.ok(took < 5, f"a new client waited {took:.1f}s after the flood ended")
        await late.close()
        tally.faults += stats.get("opened", 0)
        tally.cycles += 1
        tally.notes.append(f"RLIMIT_NOFILE {NOFILE}, {stats.get('opened', 0)} flood connections "
                           f"in 4 s while 3 clients streamed {3 * 3} turns")
        await chk.finish(clients)
        emfile = [ln for ln in gw.log().splitlines() if "Too many open files" in ln]
        tally.ok(not emfile, f"EMFILE in the gateway's log: {emfile[:3]}")
        tally.ok(gw.proc.poll() is None, "the gateway exited")

    run(go(), timeout=110)  # every tally.ok raises on a failed check
