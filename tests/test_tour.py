"""Issue 15: the README's tour, command by command, in real terminals (tmux): `make run`, `make tui`, a prompt
and its echo, `hermes-ps`, closing and resuming the TUI, closing the gateway's terminal.

Two things differ from a fresh clone, both so that this can run beside other work on a shared machine:
the gateway gets a free port and a private runtime/data dir through its HERMES_GATEWAY_* variables
(the tour's 9119 may be taken), and make's VENV is a stand-in that points at the venv running the tests,
with its install stamps fresh (installing is `make test`'s job; tests/test_cli.py checks what make would
install on a fresh clone).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import Gateway, _LIVE, kill_tree, pid_alive, wait_for
from tests.test_tui import _skip_reason
from tests.tmux_pane import Terminals

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.skipif(_skip_reason() is not None or shutil.which("make") is None,
                                 reason=_skip_reason() or "make is not installed"),
              pytest.mark.timeout(150)]


def venv_stand_in(path: Path) -> Path:
    """A VENV for make whose programs are the test venv's, with its install stamps up to date."""
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    (path / "bin" / "python").chmod(0o755)
    for prog in ("hermes-gateway", "hermes-ps"):
        (path / "bin" / prog).symlink_to(BIN / prog)
    for stamp in (".installed", ".installed-hermes"):
        (path / stamp).touch()
    return path


@pytest.fixture
def tour(tmp_dirs):
    terms = Terminals()
    venv = venv_stand_in(tmp_dirs / "venv")
    home = tmp_dirs / "home"  # a user with no Hermes configured
    home.mkdir()
    env = {"HOME": str(home), "HERMES_GATEWAY_PORT": "0", "HERMES_GATEWAY_RUNTIME_DIR": str(tmp_dirs / "run"),
           "HERMES_GATEWAY_DATA_DIR": str(tmp_dirs / "data"), "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    prefix = "exec env -u HERMES_HOME -u MAKEFLAGS -u MAKELEVEL {} ".format(
        " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    gateways: list[Gateway] = []
    yield terms, venv, env, prefix, tmp_dirs / "run", gateways
    terms.kill_server()
    for gw in gateways:
        kill_tree(gw, graceful=False)


def test_the_readme_tour(tour):
    terms, venv, env, prefix, runtime_dir, gateways = tour
    make = f"make VENV={shlex.quote(str(venv))}"
    shell = prefix + "bash --norc --noprofile -i"  # a terminal with a shell, where the tour's commands are typed

    # terminal 1: make run
    terms.open("gw", shell, cwd=str(ROOT))
    terms.type("gw", f"{make} run")
    info_file = runtime_dir / "gateway.json"

    def started() -> dict | None:
        if info_file.exists():
            info = json.loads(info_file.read_text())
            return info if pid_alive(info["pid"]) else None
        return None

    info = wait_for(started, 30, 0.2, what="make run to start the gateway")
    gw = Gateway(proc=_Attached(info["pid"]), runtime_dir=runtime_dir, data_dir=runtime_dir.parent / "data",
                 args=[], info=info)
    gateways.append(gw)
    _LIVE.append(gw)
    terms.wait_screen("gw", r"Hermes TUI:\s+hermes-gateway tui", 10, "the banner naming the TUI command")
    tree = [psutil.Process(info["pid"]), *psutil.Process(info["pid"]).children(recursive=True)]

    # terminal 2: make tui, a prompt, its echo
    terms.open("tui", shell, cwd=str(ROOT))
    terms.type("tui", f"{make} tui")
    terms.wait_screen("tui", r"─ ready │", 40, "the TUI to say ready")
    prompt = f"echo this back {uuid.uuid4().hex[:8]}"
    terms.type("tui", prompt)
    terms.wait_screen("tui", r"┊\s+" + re.escape(prompt), 30, "the echoed reply")

    # .venv/bin/hermes-ps: one session, attached
    rows = _session_rows(venv, env)
    assert len(rows) == 1 and rows[0]["attached"] == 1, rows
    pid = rows[0]["pid"]

    # close the TUI's terminal, reopen the TUI on the same session: same worker, history replayed
    terms.close("tui")
    wait_for(lambda: [r for r in _session_rows(venv, env) if r["attached"] == 0], 20, what="the session to detach")
    terms.open("tui2", shell, cwd=str(ROOT))
    terms.type("tui2", f"{make} tui TUI_ARGS=\"--resume $({shlex.quote(str(venv))}/bin/hermes-ps -q)\"")
    screen = terms.wait_screen("tui2", r"┊\s+" + re.escape(prompt), 40, "the resumed session's history")
    assert f"❯ {prompt}" in screen
    rows = wait_for(lambda: [r for r in _session_rows(venv, env) if r["attached"] == 1], 20,
                    what="the session attached again")
    assert [r["pid"] for r in rows] == [pid], "re-attached to the same worker"

    # close the gateway's terminal: the gateway ends with it, workers and all
    terms.close("gw")
    try:
        wait_for(lambda: not any(pid_alive(p.pid) for p in tree), 20, 0.2, what="the gateway to end")
    except AssertionError:
        raise AssertionError(f"still running after its terminal closed: "
                             f"{[p.pid for p in tree if pid_alive(p.pid)]}") from None
    assert not info_file.exists()


def _session_rows(venv: Path, env: dict) -> list[dict]:
    out = subprocess.run([str(venv / "bin" / "hermes-ps"), "--json"], capture_output=True, text=True, timeout=20,
                         env={**os.environ, **env})
    return [r for r in json.loads(out.stdout)["workers"] if r["kind"] == "session"] if out.returncode == 0 else []


class _Attached:
    """Enough of a Popen for conftest.kill_tree, for a gateway that make (not the test) started."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None if pid_alive(self.pid) else 0

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        try:
            psutil.Process(self.pid).wait(timeout)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            raise subprocess.TimeoutExpired("hermes-gateway", timeout or 0) from None
        return 0
