"""`hermes-gateway run --dashboard`: Hermes' real dashboard app in a child, reached through the gateway's port."""

from __future__ import annotations

import asyncio
import json
import importlib.util
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.conftest import BIN, pid_alive, run, wait_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("hermes_cli") is None,
                                reason="hermes-agent (the hermes extra) is not installed: make test installs it")

GRACE = "2"


def _child(gw) -> psutil.Process:
    def find():
        for p in gw.process().children():
            try:
                if "supervisor.dashboard.child" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    return p
            except psutil.Error:
                pass
        return None
    return wait_for(find, 20, what="the dashboard child")


def _tuis(root: psutil.Process) -> list[psutil.Process]:
    out = []
    try:
        for p in root.children(recursive=True):
            try:
                if "tui_dist/entry.js" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


async def _open_pty(port: int, token: str, attach: str, hold: asyncio.Event) -> None:
    """A tab's terminal: /api/pty through the gateway until `hold` is set, reading what the TUI draws."""
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"http://127.0.0.1:{port}/api/pty?token={token}&channel=chat-t&attach={attach}",
                                headers={"Origin": f"http://127.0.0.1:{port}"})
        while not hold.is_set():
            try:
                msg = await asyncio.wait_for(ws.receive(), 0.2)
            except asyncio.TimeoutError:
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return
        await ws.close()


async def _tab_with_tui(gw, name: str, hold: asyncio.Event):
    """A browser tab's PTY (held open until `hold` is set), the dashboard child, and the node TUI in it."""
    tab = asyncio.create_task(_open_pty(gw.port, gw.token, name, hold))
    child = _child(gw)
    tuis = await asyncio.to_thread(wait_for, lambda: _tuis(child), 30, 0.2, "a node TUI")
    return tab, child, tuis


def test_dashboard_pages_rest_and_pty_through_the_gateway_and_reaped_after_grace(gateway_factory):
    gw = gateway_factory("--dashboard", "--reap-grace", GRACE)
    base = f"http://127.0.0.1:{gw.port}"

    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/chat") as r:
                assert r.status == 200 and "Hermes Agent" in await r.text()
            async with s.get(base + "/api/status") as r:
                assert r.status == 200 and "version" in await r.json()
            async with s.get(base + "/chat", headers={"Host": "evil.example:80"}) as r:
                assert r.status == 403  # the gateway's own Host check runs before the proxy
            ws = await s.ws_connect(base + f"/api/ws?token={gw.token}")  # still the gateway's own endpoint
            assert "gateway.ready" in (await ws.receive(timeout=5)).data
            await ws.close()
        hold = asyncio.Event()
        tab = asyncio.create_task(_open_pty(gw.port, gw.token, "tab-1", hold))
        child = _child(gw)
        # the TUI in the PTY dials the gateway's /api/ws and registers a session on a gateway worker
        await asyncio.to_thread(wait_for, lambda: _tuis(child), 30, 0.2, "a node TUI under the dashboard child")
        await asyncio.to_thread(wait_for, lambda: gw.session_workers(), 30, 0.2, "the TUI's session worker")
        ps = await asyncio.to_thread(subprocess.run, [str(BIN / "hermes-ps"), "-a", "--runtime-dir", str(gw.runtime_dir)],
                                     capture_output=True, text=True, timeout=20)
        assert re.search(rf"^\(dashboard\)\s+{child.pid}\s+serving", ps.stdout, re.M), ps.stdout
        assert "(dashboard-pty)" in ps.stdout, ps.stdout
        # the chaos suite's invariant with --dashboard: hermes-ps lists exactly the processes that run

        def agrees() -> bool:
            out = subprocess.run([str(BIN / "hermes-ps"), "-a", "--json", "--runtime-dir", str(gw.runtime_dir)],
                                 capture_output=True, text=True, timeout=20)
            rows = json.loads(out.stdout)["workers"]
            tree = {child.pid} | {p.pid for p in child.children(recursive=True) if pid_alive(p.pid)}
            return ({r["pid"] for r in rows if r["kind"].startswith("dashboard")} == tree
                    and {r["pid"] for r in rows if not r["kind"].startswith("dashboard")} == set(gw.workers()))

        await asyncio.to_thread(wait_for, agrees, 10, 0.2, "hermes-ps -a to agree with the process table")
        hold.set()
        await tab
        return _tuis(child)

    tuis = run(main(), 90)
    t0 = time.monotonic()
    wait_for(lambda: not any(pid_alive(p.pid) for p in tuis) and not gw.session_workers(), 20, 0.2,
             "the tab's TUI and session worker gone after reap_grace")
    assert time.monotonic() - t0 < 15


def test_sigkilled_child_is_restarted_with_502_meanwhile_and_its_tuis_stopped(gateway_factory):
    gw = gateway_factory("--dashboard", "--reap-grace", "30")
    hold = asyncio.Event()

    async def main():
        tab, child, tuis = await _tab_with_tui(gw, "tab-k", hold)
        child.send_signal(signal.SIGKILL)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{gw.port}/api/status") as r:
                text = await r.text()
                assert r.status == 502 and "dashboard" in text and "Traceback" not in text
        await asyncio.wait_for(tab, 10)  # the tab's socket is closed, not left hanging
        return child, tuis

    child, tuis = run(main(), 90)
    wait_for(lambda: not any(pid_alive(p.pid) for p in tuis), 5, what="the dead child's TUIs stopped")
    fresh = _child(gw)
    assert fresh.pid != child.pid

    async def up():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{gw.port}/api/status") as r:
                return r.status
    wait_for(lambda: run(up()) == 200, 30, 0.3, "the restarted child serving")
    assert "dashboard child died; restarting" in gw.log()


def test_sigkilled_gateway_takes_the_child_and_its_ptys_within_2s(gateway_factory):
    gw = gateway_factory("--dashboard", "--reap-grace", "30")
    hold = asyncio.Event()

    async def scenario():
        tab, child, tuis = await _tab_with_tui(gw, "tab-g", hold)
        os.kill(gw.pid, signal.SIGKILL)
        t0 = time.monotonic()
        await asyncio.to_thread(wait_for, lambda: not pid_alive(child.pid) and not any(pid_alive(p.pid) for p in tuis),
                                2.0, 0.05, "child and TUIs gone")
        hold.set()
        await asyncio.wait_for(tab, 5)
        return time.monotonic() - t0

    assert run(scenario(), 90) <= 2.0


def test_dashboard_that_cannot_start_exits_2_with_one_line(gateway_factory, tmp_dirs):
    broken = Path(tmp_dirs) / "broken"
    (broken / "hermes_cli").mkdir(parents=True)
    (broken / "hermes_cli" / "__init__.py").write_text("raise ImportError('hermes_cli is broken here')\n")
    # a broken hermes-agent install: the copy first on the path cannot be imported
    path = os.pathsep.join([str(broken)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    gw = gateway_factory("--dashboard", env={"PYTHONPATH": path}, wait=False)
    gw.proc.wait(30)
    assert gw.proc.returncode == 2
    assert "--dashboard: dashboard unavailable:" in gw.log()
