"""Process faults: SIGKILL / SIGSTOP / SIGCONT of workers (mid-turn, mid-create), SIGKILL of the fork
server, SIGKILL of the broker, SIGKILL of a worker's slash subprocess.

The builtin runtime runs slash commands on a thread and starts no subprocess, so the
slash-subprocess kill runs against the `hermes` runtime (the real Hermes slash worker,
hermes-agent 0.19.0, agent pointed at the fake OpenAI server); it skips, saying so, when
that extra is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import time

import pytest

from tests.chaos.invariants import Checker, Tally, settle
from tests.chaos.tracked import Tracked
from tests.client import RpcFailed
from tests.conftest import pid_alive, run

HB, LIVENESS = 0.25, 6  # a silent worker is declared lost after 1.5 s
FLAGS = ("--reap-grace", "1", "--list-grace", "0.5", "--heartbeat-interval", str(HB), "--heartbeat-liveness",
         str(LIVENESS), "--echo-delay", "0.01", "--warm-pool", "1", "--stop-timeout", "1")
STREAM = " ".join(f"s{i}" for i in range(100))  # ~1 s of streaming


@pytest.fixture(scope="module")
def gw(rig):
    return rig.start(*FLAGS, name="procs")


def _reclaimed(c: Tracked, sid: str) -> dict | None:
    return next((e for e in c.by_session[sid] if e["type"] == "session.reclaimed"), None)


async def _session_with_history(c: Tracked, tally: Tally, text: str) -> tuple[str, str]:
    sid = await c.create()
    done = await c.turn(sid, text)
    tally.ok(done["payload"]["status"] == "complete", "warm-up turn failed")
    return sid, c.keys[sid]


async def _resume_has(c: Tracked, key: str, texts: list[str], tally: Tally) -> str:
    res = await c.call("session.resume", {"session_id": key})
    stored = [m["text"] for m in res["messages"]]
    for t in texts:
        tally.ok(any(t in s for s in stored), f"history of {key} lost {t[:30]!r}: {stored}")
    done = await c.turn(res["session_id"], "after the fault")
    tally.ok(done["payload"]["text"] == "after the fault", "a resumed session does not run turns")
    return res["session_id"]


# -- workers --------------------------------------------------------------------
def _worker_kill(rig, gw, tally: Tally, cycles: int) -> None:
    chk = Checker(gw, tally)

    async def go():
        await chk.processes(set())
        base = await chk.baseline()
        observer = await Tracked.open(gw.url)
        clients = []
        for i in range(cycles):
            c = await Tracked.open(gw.url)
            clients.append(c)
            sid, key = await _session_with_history(c, tally, f"before kill {i}")
            pid = chk.census().sessions[sid]
            await c.call("prompt.submit", {"session_id": sid, "text": f"killed mid-turn {i} {STREAM}"})
            await c.wait_event(lambda e: e.get("session_id") == sid and e["type"] == "message.delta", 5)
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            tally.faults += 1
            ev = await c.wait_event(lambda e: e.get("session_id") == sid and e["type"] == "session.reclaimed", 5)
            took = time.monotonic() - t0
            tally.ok(ev["payload"]["reason"] == "worker_exit", f"reclaimed for {ev['payload']}")
            tally.ok(took <= 1.0, f"a killed worker was noticed after {took:.2f}s")
            tally.notes.append(f"kill seen in {took * 1000:.0f} ms")
            tally.ok(any(e["type"] == "error" for e in c.by_session[sid]), "no error event before the reclaim")
            await _resume_has(c, key, [f"before kill {i}", f"killed mid-turn {i}"], tally)
            tally.cycles += 1
        await chk.finish(clients, observer, base)

    run(go(), timeout=60 + 10 * cycles)


def test_worker_sigkill_midturn(rig, gw, tally):
    _worker_kill(rig, gw, tally, cycles=1)


def _worker_stop(rig, gw, tally: Tally, cycles: int) -> None:
    chk = Checker(gw, tally)

    async def go():
        await chk.processes(set())
        observer = await Tracked.open(gw.url)
        clients = []
        for i in range(cycles):
            c = await Tracked.open(gw.url)
            clients.append(c)
            sid, key = await _session_with_history(c, tally, f"before stop {i}")
            pid = chk.census().sessions[sid]
            # a short stop (below the heartbeat timeout): the turn simply continues
            await c.call("prompt.submit", {"session_id": sid, "text": f"paused {i} {STREAM}"})
            await c.wait_event(lambda e: e.get("session_id") == sid and e["type"] == "message.delta", 5)
            os.kill(pid, signal.SIGSTOP)
            tally.faults += 1
            await asyncio.sleep(HB * LIVENESS / 5)  # a beat may already be up to HB late when the stop lands
            os.kill(pid, signal.SIGCONT)
            n_done = lambda: sum(e["type"] == "message.complete" for e in c.by_session[sid])  # noqa: E731
            await c.wait_event(lambda e: n_done() >= 2, 15)
            tally.ok(_reclaimed(c, sid) is None and pid_alive(pid), "a short SIGSTOP got the worker killed")
            tally.ok(c.deltas(sid).endswith(STREAM), "the paused stream lost words")
            # a long stop: the heartbeat is lost, the worker is killed, the client is told, history survives
            await c.call("prompt.submit", {"session_id": sid, "text": f"frozen {i} {STREAM}"})
            await c.wait_event(lambda e: e.get("session_id") == sid and e["type"] == "message.delta"
                               and e["payload"]["text"].startswith("frozen"), 5)
            t0 = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            tally.faults += 1
            ev = await c.wait_event(lambda e: e.get("session_id") == sid and e["type"] == "session.reclaimed", 15)
            took = time.monotonic() - t0
            tally.ok(ev["payload"]["reason"] == "heartbeat_lost", f"reclaimed for {ev['payload']}")
            limit = HB * LIVENESS + 1.5
            tally.ok(took <= limit, f"a frozen worker was reclaimed after {took:.2f}s (limit {limit}s)")
            tally.notes.append(f"freeze reclaimed in {took:.2f}s")
            ok, _ = await settle(lambda: not pid_alive(pid), 5)
            tally.ok(ok, "the frozen worker is still there")
            await _resume_has(c, key, [f"before stop {i}", f"paused {i}", f"frozen {i}"], tally)
            tally.cycles += 1
        await chk.finish(clients, observer)

    run(go(), timeout=60 + 15 * cycles)


def test_worker_sigstop_sigcont(rig, gw, tally):
    _worker_stop(rig, gw, tally, cycles=1)


def _spare_kill(rig, gw, tally: Tally, cycles: int) -> None:
    """Kill the warm spare right as session.create arrives (at several offsets around the send)."""
    chk = Checker(gw, tally)
    offsets = [-0.002, 0.0, 0.0005, 0.001, 0.002, 0.004, 0.008]

    async def go():
        await chk.processes(set())
        observer = await Tracked.open(gw.url)
        c = await Tracked.open(gw.url)
        outcomes: dict[str, int] = {}
        for i in range(cycles):
            ok, spares = await settle(lambda: chk.census().spares, 10)
            tally.ok(ok, "no warm spare to kill")
            spare = spares[0]
            delay = offsets[i % len(offsets)]
            if delay < 0:
                os.kill(spare, signal.SIGKILL)
                await asyncio.sleep(-delay)
            task = asyncio.create_task(c.request("session.create", {"cols": 80}, timeout=20))
            if delay >= 0:
                await asyncio.sleep(delay)
                os.kill(spare, signal.SIGKILL)
            tally.faults += 1
            resp = await task
            if "result" in resp:
                sid = resp["result"]["session_id"]
                try:
                    done = await c.turn(sid, f"survivor {i}", timeout=10)
                    tally.ok(done["payload"]["text"] == f"survivor {i}", "a created session gives a wrong reply")
                    outcome = "created elsewhere"
                except RpcFailed:  # the killed spare answered the create first: its client is told
                    ev = await c.wait_event(lambda e: e.get("session_id") == sid
                                            and e["type"] == "session.reclaimed", 5)
                    tally.ok(ev["payload"]["reason"] == "worker_exit", f"reclaimed for {ev['payload']}")
                    outcome = "created, then reclaimed"
                await c.call("session.close", {"session_id": sid})
                c.attached.discard(sid)
            else:
                # a spare that dies before answering is replaced: the create goes to the next worker
                tally.ok(False, f"create failed although another worker could take it: {resp['error']}")
                outcome = f"error {resp['error']['code']}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            tally.cycles += 1
        tally.notes.append(", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
        await chk.finish([c], observer)

    run(go(), timeout=60 + 5 * cycles)


def test_spare_sigkill_midcreate(rig, gw, tally):
    _spare_kill(rig, gw, tally, cycles=7)


# -- the fork server --------------------------------------------------------------
def _zygote_kill(rig, gw, tally: Tally, cycles: int) -> None:
    chk = Checker(gw, tally)

    async def go():
        await chk.processes(set())
        observer = await Tracked.open(gw.url)
        clients = []
        for i in range(cycles):
            c = await Tracked.open(gw.url)
            clients.append(c)
            made = [await _session_with_history(c, tally, f"zygote {i} session {j}") for j in range(2)]
            before = chk.census()
            old = before.managed()
            t0 = time.monotonic()
            os.kill(before.zygotes[0], signal.SIGKILL)
            tally.faults += 1
            for sid, _ in made:
                ev = await c.wait_event(lambda e, s=sid: e.get("session_id") == s and e["type"] == "session.reclaimed", 5)
                tally.ok(ev["payload"]["reason"] == "worker_exit", f"reclaimed for {ev['payload']}")
            ok, _ = await settle(lambda: not any(pid_alive(p) for p in old), 2.0)
            tally.ok(ok, f"workers of the dead fork server still alive after 2 s: {[p for p in old if pid_alive(p)]}")
            await chk.processes(set())  # a new zygote, lobby and spare; nothing of the old one
            await chk.fresh_client()
            tally.notes.append(f"served {time.monotonic() - t0:.2f}s after the kill")
            for j, (sid, key) in enumerate(made):
                await _resume_has(c, key, [f"zygote {i} session {j}"], tally)
            tally.cycles += 1
        await chk.finish(clients, observer)

    run(go(), timeout=60 + 15 * cycles)


def test_zygote_sigkill(rig, gw, tally):
    _zygote_kill(rig, gw, tally, cycles=1)


# -- the broker ---------------------------------------------------------------------
def _broker_kill(rig, tally: Tally, cycles: int) -> None:
    gw = rig.start(*FLAGS, name="broker")
    chk = Checker(gw, tally)
    keys: list[tuple[str, str]] = []

    async def before_kill(i: int) -> None:
        await chk.processes(set())
        c = await Tracked.open(gw.url)
        for j in range(2):
            _, key = await _session_with_history(c, tally, f"broker {i} session {j}")
            keys.append((key, f"broker {i} session {j}"))
        chk.wire([c])
        chk.store([c])

    async def after_restart() -> None:
        await chk.processes(set())
        await chk.fresh_client()
        c = await Tracked.open(gw.url)
        for key, text in keys:
            sid = await _resume_has(c, key, [text], tally)
            await c.call("session.close", {"session_id": sid})
        c.attached.clear()
        await chk.finish([c])

    for i in range(cycles):
        run(before_kill(i))
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(5)
        tally.faults += 1
        took = run(chk.all_gone(2.0, since=t0))
        tally.notes.append(f"all gone in {took:.2f}s")
        gw = rig.start(*FLAGS, name="broker")
        chk.gw = gw
        run(after_restart(), timeout=60)
        tally.cycles += 1


def test_broker_sigkill(rig, tally):
    _broker_kill(rig, tally, cycles=1)


# -- a planted journal (issue 14 item 2) ----------------------------------------------------
def test_planted_journal(rig, tally):
    """The broker SIGKILLed, then its journal replaced by one naming an unrelated process of ours (right pid,
    right start time) and a workers.json.tmp link to a file of ours: the restart kills nothing of them,
    overwrites nothing, and the old session resumes whole."""
    import json
    import subprocess

    import psutil

    gw = rig.start(*FLAGS, name="planted")
    chk = Checker(gw, tally)
    keys: list[str] = []

    async def before_kill() -> None:
        await chk.processes(set())
        c = await Tracked.open(gw.url)
        _, key = await _session_with_history(c, tally, "planted journal")
        keys.append(key)
        chk.wire([c])
        chk.store([c])

    run(before_kill())
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(5)
    run(chk.all_gone(2.0, since=t0))
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True, stdin=subprocess.DEVNULL)
    victim = gw.data_dir.parent / "victim.txt"
    victim.write_text("precious\n")
    try:
        p = psutil.Process(bystander.pid)
        rows = [{"pid": p.pid, "create_time": p.create_time(), "pgid": p.pid, "kind": "session", "session": "x"},
                {"pid": p.pid, "create_time": p.create_time(), "pgid": p.pid, "kind": "zygote"}]
        (gw.data_dir / "workers.json").write_text(json.dumps(rows))
        (gw.data_dir / "workers.json.tmp").symlink_to(victim)
        tally.faults += 2
        gw = rig.start(*FLAGS, name="planted")
        chk.gw = gw

        async def after_restart() -> None:
            await chk.processes(set())
            await chk.fresh_client()
            c = await Tracked.open(gw.url)
            sid = await _resume_has(c, keys[0], ["planted journal"], tally)
            await c.call("session.close", {"session_id": sid})
            c.attached.clear()
            await chk.finish([c])

        run(after_restart(), timeout=60)
        tally.ok(bystander.poll() is None, "the process named by the planted journal was killed")
        tally.ok(victim.read_text() == "precious\n", "the workers.json.tmp link was followed")
        tally.cycles += 1
    finally:
        bystander.kill()
        bystander.wait(5)


# -- a worker's slash subprocess (hermes runtime) -------------------------------------------
def _slash_children(chk: Checker, pid: int) -> list[int]:
    return [p for p, owner in chk.census().children.items() if owner == pid]


def _slash_kill(rig, tally: Tally, cycles: int) -> None:
    if importlib.util.find_spec("tui_gateway") is None:
        pytest.skip("hermes-agent is not installed: the builtin runtime has no slash subprocess to kill")
    from tests.fake_openai import FakeOpenAI

    with FakeOpenAI(reply="hello from the fake model", delay=0.002) as fake:
        gw = rig.start("--runtime", "hermes", "--openai-base-url", fake.base_url, "--openai-model", "fake-model",
                       "--reap-grace", "1", "--list-grace", "0.5", name="hermes")
        chk = Checker(gw, tally)

        async def go():
            await chk.processes(set(), timeout=30)
            observer = await Tracked.open(gw.url)
            c = await Tracked.open(gw.url)
            for i in range(cycles):
                sid = await c.create()
                out = await c.call("slash.exec", {"session_id": sid, "command": "help"}, timeout=60)
                tally.ok(bool(out.get("output")), "the slash worker gave no output")
                pid = chk.census().sessions[sid]
                kids = _slash_children(chk, pid)
                tally.ok(bool(kids), "no slash subprocess under the worker")
                for k in kids:
                    os.kill(k, signal.SIGKILL)
                    tally.faults += 1
                ok, _ = await settle(lambda: not _slash_children(chk, pid), 5)
                tally.ok(ok, "the killed slash subprocess is still in the process table (a zombie?)")
                tally.ok(pid_alive(pid), "killing the slash subprocess took the worker down")
                resp = await c.request("slash.exec", {"session_id": sid, "command": "help"}, timeout=30)
                tally.ok("result" in resp or resp["error"]["code"] == 5030, f"slash after the kill: {resp}")
                tally.notes.append("slash after the kill: " + ("ok" if "result" in resp else resp["error"]["message"]))
                done = await c.turn(sid, f"still here {i}", timeout=60)
                tally.ok(done["payload"]["status"] == "complete", "the session stopped working")
                # a fresh worker for the same history gets a fresh slash worker
                key = c.keys[sid]
                tally.ok(await c.call("session.close", {"session_id": sid}) == {"closed": True}, "close failed")
                c.attached.discard(sid)
                res = await c.call("session.resume", {"session_id": key}, timeout=60)
                out = await c.call("slash.exec", {"session_id": res["session_id"], "command": "help"}, timeout=60)
                tally.ok(bool(out.get("output")), "a resumed session has no slash worker")
                await c.call("session.close", {"session_id": res["session_id"]})
                c.attached.discard(res["session_id"])
                tally.cycles += 1
            await chk.finish([c], observer)

        run(go(), timeout=120 + 60 * cycles)


@pytest.mark.timeout(180)
def test_slash_subprocess_sigkill(rig, tally):
    _slash_kill(rig, tally, cycles=1)


# -- long variants ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_sigkill_midturn_long(rig, gw, tally):
    _worker_kill(rig, gw, tally, cycles=20)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_worker_sigstop_sigcont_long(rig, gw, tally):
    _worker_stop(rig, gw, tally, cycles=8)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spare_sigkill_midcreate_long(rig, gw, tally):
    _spare_kill(rig, gw, tally, cycles=60)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zygote_sigkill_long(rig, gw, tally):
    _zygote_kill(rig, gw, tally, cycles=10)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_broker_sigkill_long(rig, tally):
    _broker_kill(rig, tally, cycles=8)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slash_subprocess_sigkill_long(rig, tally):
    _slash_kill(rig, tally, cycles=6)
