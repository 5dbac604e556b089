"""Issue 13 item 2: Hermes' slash worker forked by the fork server, not started as a fresh interpreter.

It is the zygote's child (forked from the preloaded image, so it shares that heap),
in the session worker's process group (so reaping the session takes it), small, and
Hermes' JSON-lines protocol runs over the pipes the worker passed (SCM_RIGHTS).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.client import Client
from tests.conftest import run, wait_for
from tests.test_hermes_runtime import REPLY, fake, gone, gw, hermes_children, worker_of  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(90)
USS_LIMIT = 16 * 1024 * 1024  # a fresh interpreter is ~37 MiB; forked, ~12 (the issue aims at 8: not reached)


def _zygote(gw) -> psutil.Process:
    return next(p for p in gw.descendants() if "hermes-zygote" in " ".join(p.cmdline()))


def test_slash_worker_is_forked_into_the_sessions_group_small_and_reaped_with_it(gw):
    zygote = _zygote(gw)

    async def go():
        c = await Client.open(gw.url)
        created = await c.call("session.create", {"cols": 80}, timeout=20)
        sid = created["session_id"]
        pid = worker_of(gw, sid)
        out = await c.call("slash.exec", {"session_id": sid, "command": "help"}, timeout=60)
        assert "Available Commands" in out["output"]
        slash = hermes_children(pid)
        assert slash, "no slash worker"
        for p in slash:
            assert p.ppid() == zygote.pid  # forked by the fork server, not a `python -m` child of the worker
            assert os.getpgid(p.pid) == pid  # in the session's group: the broker's group kill takes it
        uss = max(p.memory_full_info().uss for p in slash)
        assert uss <= USS_LIMIT, f"slash worker USS {uss / 2**20:.1f} MiB"
        again = await c.call("slash.exec", {"session_id": sid, "command": "help"}, timeout=30)
        assert again["output"] == out["output"]  # the same worker serves the next command
        assert [p.pid for p in hermes_children(pid)] == [p.pid for p in slash]
        c.abort()  # detach, then the reaper reclaims the session after reap_grace
        return pid, [p.pid for p in slash]

    pid, slash_pids = run(go(), 80)
    wait_for(lambda: gone(pid) and all(map(gone, slash_pids)), 15, what="the reaped session's slash worker to exit")


def test_a_killed_forked_slash_worker_is_survived_and_replaced(gw):
    async def go():
        c = await Client.open(gw.url)
        try:
            sid = (await c.call("session.create", {"cols": 80}, timeout=20))["session_id"]
            pid = worker_of(gw, sid)
            await c.call("slash.exec", {"session_id": sid, "command": "help"}, timeout=60)
            first = hermes_children(pid)
            for p in first:
                os.kill(p.pid, signal.SIGKILL)
            wait_for(lambda: all(map(gone, [p.pid for p in first])), 5, what="the killed slash worker to be reaped")
            resp = await c.request("slash.exec", {"session_id": sid, "command": "help"}, timeout=30)
            assert "result" in resp or resp["error"]["code"] == 5030  # Hermes' own answer for a dead slash worker
            # that answer quotes the dead worker's stderr: nothing of the fork (runpy's re-run warning) in it
            assert "RuntimeWarning" not in resp.get("error", {}).get("message", ""), resp
            done = await c.turn(sid, "still here", timeout=60)
            assert done["payload"]["status"] == "complete" and done["payload"]["text"] == REPLY
            assert pid in gw.session_workers()
            await c.call("session.close", {"session_id": sid})
        finally:
            await c.close()

    run(go(), 80)


def _slash_sockets(zygote: psutil.Process) -> list[str]:
    conns = getattr(zygote, "net_connections", None) or zygote.connections
    return [str(c.laddr) for c in conns("unix") if os.path.basename(str(c.laddr)).startswith("slash-")]


def test_the_fork_servers_socket_is_private(gw):
    zygote = _zygote(gw)
    socks = _slash_sockets(zygote)
    assert socks == [str(gw.runtime_dir / f"slash-{zygote.pid}.sock")]  # in the broker's runtime dir, by pid
    assert stat.S_IMODE(os.stat(socks[0]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(gw.runtime_dir).st_mode) == 0o700


def test_a_killed_fork_servers_socket_is_swept_and_the_new_one_serves(gw):
    old = _zygote(gw)
    stale = gw.runtime_dir / f"slash-{old.pid}.sock"
    assert stale.exists()
    os.kill(old.pid, signal.SIGKILL)  # it cannot unlink its own socket
    wait_for(lambda: any("hermes-zygote" in " ".join(p.cmdline()) and p.pid != old.pid for p in gw.descendants()),
             20, what="the broker to start a new fork server")
    new = _zygote(gw)
    wait_for(lambda: _slash_sockets(new), 20, what="the new fork server to listen")
    assert not stale.exists(), "the dead fork server's socket was left in the runtime dir"
    assert sorted(p.name for p in gw.runtime_dir.glob("slash-*.sock")) == [f"slash-{new.pid}.sock"]

    async def go():
        c = await Client.open(gw.url)
        try:
            sid = (await c.call("session.create", {"cols": 80}, timeout=30))["session_id"]
            out = await c.call("slash.exec", {"session_id": sid, "command": "help"}, timeout=60)
            assert "Available Commands" in out["output"]
            assert [p.ppid() for p in hermes_children(worker_of(gw, sid))] == [new.pid]
            await c.call("session.close", {"session_id": sid})
        finally:
            await c.close()

    run(go(), 80)


_LOGGING_CHILD = r"""
import logging, os, threading
from worker.hermes.slash_fork import setup_logging_inline
setup_logging_inline()
logging.getLogger("tools.slash").warning("written-before-exit")
print(threading.active_count(), flush=True)
os._exit(0)  # how a forked slash worker ends: no atexit, no listener stop
"""


def test_a_forked_slash_worker_logs_without_a_listener_thread(tmp_path):
    """Its logging is Hermes' (agent.log, errors.log) but written on the logging thread: no QueueListener thread
    (~0.1 MiB of a forked child's USS), and a record is in the file even though the child ends with os._exit."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HERMES_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", _LOGGING_CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"  # the main thread only
    assert "written-before-exit" in (home / "logs" / "errors.log").read_text()
    assert "written-before-exit" in (home / "logs" / "agent.log").read_text()


_RUN_CHILD = r"""
import sys
import tui_gateway.slash_worker  # as the fork server has it: imported before the child runs it as __main__
from worker.hermes.slash_fork import _run_slash
sys.exit(_run_slash([sys.executable, "-m", "tui_gateway.slash_worker", "--session-key", "k", "--model", "m"]))
"""


def test_a_forked_slash_worker_runs_hermes_module_without_runpy_warnings(tmp_path):
    """Hermes shows a dead slash worker's stderr to the client (5030): runpy's warning that the preloaded module
    is run again as __main__ must not be in it."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HERMES_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", _RUN_CHILD], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=60)
    assert "RuntimeWarning" not in out.stderr, out.stderr[-2000:]
