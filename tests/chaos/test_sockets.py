"""Socket faults through a TCP proxy: reset, blackhole, latency, cut after N bytes, half-close.

A dropped client must be detected (reset, cut and half-close at once, blackhole by the
WebSocket ping timeout), its sessions detach, a client that comes back within the grace
re-attaches to the SAME worker and gets what it missed, and the rest are reaped.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.chaos.invariants import Checker, Tally, settle
from tests.chaos.proxy import Proxy
from tests.chaos.tracked import Tracked
from tests.conftest import run

PING = 0.5
REAP_GRACE = 3.0  # the victim resumes after detection, settling and a new connection: room for a loaded machine
FLAGS = ("--reap-grace", str(REAP_GRACE), "--list-grace", "0.5", "--ws-ping-interval", str(PING),
         "--ws-ping-timeout", str(PING), "--echo-delay", "0.01", "--warm-pool", "1")
# how soon a dropped connection must show as detached: at once, or by the ping timeout (+ close timeout)
DETECT_LIMIT = {"reset": 2.0, "cut": 2.0, "half_close": 2.0, "blackhole": 3 * PING + 3.0}
STREAM = " ".join(f"w{i}" for i in range(60))  # ~0.6 s of streaming at --echo-delay 0.01


@pytest.fixture(scope="module")
def gw(rig):
    return rig.start(*FLAGS, name="sockets")


async def _detached(observer: Tracked, sid: str) -> bool:
    rows = (await observer.call("session.active_list", {"current_session_id": sid}))["sessions"]
    row = next((r for r in rows if r["id"] == sid), None)
    return row is None or not row["attached"]


async def _wait_detached(observer: Tracked, sids: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    pending = set(sids)
    while pending and time.monotonic() - t0 < timeout:
        for sid in list(pending):
            if await _detached(observer, sid):
                pending.discard(sid)
        await asyncio.sleep(0.02)
    assert not pending, f"sessions still attached {timeout}s after the fault: {pending}"
    return time.monotonic() - t0


async def _cycle(gw, chk: Checker, proxy: Proxy, observer: Tracked, mode: str, n: int, tally: Tally) -> list[Tracked]:
    victims = [await Tracked.open(gw.url, **proxy.via()) for _ in range(n)]
    sids = []
    for v in victims:
        sid = await v.create()
        sids.append(sid)
        done = await v.turn(sid, f"warm up {v.name}")
        tally.ok(done["payload"]["status"] == "complete", "warm-up turn failed")
    pids = {sid: chk.census().sessions.get(sid) for sid in sids}
    for v, sid in zip(victims, sids):
        await v.call("prompt.submit", {"session_id": sid, "text": f"{v.name} {STREAM}"})
    await asyncio.sleep(0.1)  # the fault lands mid-stream
    if mode == "latency":
        proxy.latency = 0.05
        for v, sid in zip(victims, sids):
            n_complete = lambda s=sid, v=v: sum(e["type"] == "message.complete" for e in v.by_session[s])  # noqa: E731
            await v.wait_event(lambda e: n_complete() >= 2, 20)  # the warm-up turn's and this one's
            tally.ok(v.deltas(sid).endswith(STREAM), "a delayed stream lost or reordered words")
            pong = await v.call("gateway.ping")
            tally.ok(pong == {"ok": True}, "ping through latency failed")
        tally.ok(not any([await _detached(observer, s) for s in sids]), "latency made the gateway drop a client")
        tally.faults += 1
        proxy.latency = 0.0
        return victims
    tally.faults += n  # the victims' connections (the proxy also carries earlier, already dropped ones)
    if mode == "reset":
        proxy.reset()
    elif mode == "blackhole":
        proxy.blackhole()
    elif mode == "cut":
        proxy.cut_after(random.randint(1, 3000))
    elif mode == "half_close":
        proxy.half_close()
    took = await _wait_detached(observer, sids, DETECT_LIMIT[mode] + 5)
    tally.ok(took <= DETECT_LIMIT[mode], f"{mode}: detach seen after {took:.2f}s (limit {DETECT_LIMIT[mode]}s)")
    tally.notes.append(f"{mode} detected in {took:.2f}s")
    if mode == "blackhole":
        proxy.reset()
        proxy.blackhole(False)
    await settle(lambda: all(v.closed for v in victims), 5)
    # the first victim comes back within the grace: same worker, and it gets the end of its stream
    back = await Tracked.open(gw.url, **proxy.via())
    key = victims[0].keys[sids[0]]
    res = await back.call("session.resume", {"session_id": key})
    tally.ok(res["session_id"] == sids[0], "a resume within the grace did not re-attach the live session")
    tally.ok(chk.census().sessions.get(sids[0]) == pids[sids[0]], "the re-attached session moved to another process")
    # events sent into the dead connection before it was detected are fetched by seq, as a client does
    await back.catch_up(sids[0], victims[0].last_seq(sids[0]))
    done = await back.wait_event(lambda e: e.get("session_id") == sids[0] and e["type"] == "message.complete", 20)
    tally.ok(done["payload"]["text"].endswith(STREAM), "the missed end of the stream was not replayed")
    return victims + [back]


def _scenario(rig, gw, tally: Tally, mode: str, cycles: int, n: int) -> None:
    chk = Checker(gw, tally)

    async def go():
        await chk.processes(set())
        base = await chk.baseline()
        proxy = await Proxy(gw.port).start()
        observer = await Tracked.open(gw.url)
        clients: list[Tracked] = []
        try:
            for _ in range(cycles):
                clients += await _cycle(gw, chk, proxy, observer, mode, n, tally)
                tally.cycles += 1
                await chk.fresh_client(via=proxy.via(), turn=False)
            await chk.finish(clients, observer, base)
        finally:
            await proxy.close()

    run(go(), timeout=60 + cycles * 20)


@pytest.mark.parametrize("mode", ["reset", "blackhole", "cut", "half_close", "latency"])
def test_socket_fault(rig, gw, tally, mode):
    _scenario(rig, gw, tally, mode, cycles=1, n=2)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", ["reset", "blackhole", "cut", "half_close", "latency"])
def test_socket_fault_long(rig, gw, tally, mode):
    _scenario(rig, gw, tally, mode, cycles=12, n=4)
