"""Issue 16: SIGKILL of either broker in the middle of a restart's hand-over.

Whatever the moment of the kill: within 2 s either one broker serves and hermes-ps lists
every live worker of this gateway (no orphan), or no process of the gateway is left; and
a gateway started afterwards (or the survivor) resumes the session with its stored turn.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.chaos.invariants import Tally, settle, tagged
from tests.chaos.tracked import Tracked
from tests.conftest import BIN, run

FLAGS = ("--reap-grace", "30", "--heartbeat-interval", "0.25", "--heartbeat-liveness", "6", "--echo-delay", "0.01",
         "--stop-timeout", "1")
STREAM = " ".join(f"r{i}" for i in range(150))


def _info(gw) -> dict:
    try:
        return json.loads((gw.runtime_dir / "gateway.json").read_text())
    except (OSError, ValueError):
        return {}


def _serving(gw) -> int:
    """The pid of the broker that serves: named in gateway.json, alive, and accepting on its port."""
    info = _info(gw)
    pid = int(info.get("pid") or 0)
    try:
        if not pid or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return 0
    except psutil.Error:
        return 0
    try:
        with socket.create_connection(("127.0.0.1", int(info["port"])), timeout=0.5):
            return pid
    except OSError:
        return 0


def _successor(old: int) -> int:
    try:
        kids = psutil.Process(old).children()
    except psutil.Error:
        return 0
    for p in kids:
        try:
            if "supervisor.commands.cli" in " ".join(p.cmdline()):
                return p.pid
        except psutil.Error:
            pass
    return 0


def _workers(tag: str) -> set[int]:
    out = set()
    for p in tagged(tag):
        try:
            if " ".join(p.cmdline()).startswith("hermes-worker"):
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


def _table(tag: str) -> str:
    rows = []
    for p in tagged(tag):
        try:
            rows.append(f"{p.pid} ppid={p.ppid()} {' '.join(p.cmdline())[:70]}")
        except psutil.Error:
            pass
    return "\n".join(rows)


def _listed(gw) -> set[int] | None:
    out = subprocess.run([str(Path(sys.executable).parent / "hermes-ps"), "-a", "--json", "--runtime-dir",
                          str(gw.runtime_dir)], capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        return None
    return {r["pid"] for r in json.loads(out.stdout)["workers"] if r["pid"]}


def _kill_mid_handover(rig, tally: Tally, side: str, cycles: int) -> None:
    rng = random.Random(16)
    for i in range(cycles):
        gw = rig.start(*FLAGS, name=f"handover-{side}")
        tag = gw.chaos_tag
        stored = f"stored before restart {i}"

        async def before() -> tuple[Tracked, str]:
            c = await Tracked.open(gw.url)
            sid = await c.create()
            done = await c.turn(sid, stored)
            tally.ok(done["payload"]["status"] == "complete", "the warm-up turn failed")
            await c.call("prompt.submit", {"session_id": sid, "text": STREAM})  # a turn runs through the cut
            return c, c.keys[sid]

        c, key = run(before())
        old = gw.pid
        cmd = subprocess.Popen([str(BIN / "hermes-gateway"), "restart", "--runtime-dir", str(gw.runtime_dir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        new = 0
        deadline = time.monotonic() + 20
        while not new and time.monotonic() < deadline:
            new = _successor(old)
            time.sleep(0.005)
        tally.ok(bool(new), "no successor process appeared")
        time.sleep(rng.uniform(0.0, 2.0))  # anywhere from its start-up to after the cut
        victim = old if side == "old" else new
        t0 = time.monotonic()
        try:
            os.kill(victim, signal.SIGKILL)
            tally.faults += 1
        except ProcessLookupError:
            pass
        cmd.wait(30)

        def settled() -> bool:
            serving = _serving(gw)
            live = _workers(tag)
            if not serving:
                return not live and not tagged(tag)  # nothing of the gateway is left
            listed = _listed(gw)
            return listed is not None and live <= listed
        ok, _ = run(settle(settled, 4.0))
        took = time.monotonic() - t0
        serving = _serving(gw)
        tally.ok(ok, f"cycle {i} ({side} killed): orphans or unlisted workers: live={sorted(_workers(tag))} "
                     f"listed={_listed(gw) if serving else '-'} serving={serving}\n{_table(tag)}\n{gw.log()[-3000:]}")
        if not serving:
            tally.ok(took <= 2.5, f"the gateway's processes took {took:.2f}s to go")
            tally.recovered(took)
        tally.notes.append(f"{side} killed: {'pid ' + str(serving) + ' serves' if serving else 'all gone'} "
                           f"after {took:.2f}s")
        if not serving:
            gw = rig.start(*FLAGS, name=f"handover-{side}")

        async def after() -> None:
            c2 = await Tracked.open(gw.url.replace(str(gw.port), str(_info(gw)["port"])))
            res = await c2.call("session.resume", {"session_id": key})
            texts = [m["text"] for m in res["messages"]]
            tally.ok(any(stored in t for t in texts), f"the stored turn is lost: {texts}")
            await c2.call("session.close", {"session_id": res["session_id"]})

        run(after(), timeout=60)
        pid = _serving(gw)
        if pid:
            os.kill(pid, signal.SIGTERM)
            run(settle(lambda: not tagged(tag), 15))
        tally.ok(not tagged(tag), f"processes left after the cycle: {[p.pid for p in tagged(tag)]}")
        tally.cycles += 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("side", ["old", "new"])
def test_broker_sigkill_mid_handover(rig, tally, side):
    _kill_mid_handover(rig, tally, side, cycles=2)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("side", ["old", "new"])
def test_broker_sigkill_mid_handover_long(rig, tally, side):
    _kill_mid_handover(rig, tally, side, cycles=12)
