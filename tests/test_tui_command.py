"""Issue 15: `hermes-gateway tui` runs the Node TUI from the hermes-agent wheel against the running gateway.

The real TUI under tmux (as tests/test_tui.py drives it): with no Hermes of the user's own it gets a
throwaway HERMES_HOME, removed when the terminal closes; with one (~/.hermes) it gets that; `--resume KEY`
brings a stored session back. And the one-line errors: no gateway (exit 3), node missing or too old,
the TUI (the hermes extra) not installed (exit 1).
"""

from __future__ import annotations

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

from supervisor.commands.tui import node_version_ok
from tests.conftest import BIN, wait_for
from tests.test_tui import _entry_js, _skip_reason, ps_sessions
from tests.tmux_pane import Terminals

ROOT = Path(__file__).resolve().parent.parent


def tui_cli(*args: str, env: dict | None = None, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *python_flags, "-m", "supervisor.commands.cli", "tui", *args],
                          capture_output=True, text=True, env=full, timeout=30)


def test_node_version_rule():
    for ok in ("v20.19.0", "v20.20.2", "v22.7.0", "v22.12.1", "v23.0.0", "v24.3.0"):
        assert node_version_ok(ok), ok
    for old in ("v18.19.0", "v20.18.3", "v21.7.3", "v22.6.0", "v16.0.0", "", "garbage"):
        assert not node_version_ok(old), old


def test_no_gateway_running_exits_3(tmp_dirs):
    if shutil.which("node") is None or _entry_js() is None:
        pytest.skip("needs node and hermes-agent: they are checked before the gateway")
    out = tui_cli("--runtime-dir", str(tmp_dirs / "nothing-here"))
    assert out.returncode == 3, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no gateway running" in lines[0] and str(tmp_dirs / "nothing-here") in lines[0], lines


def test_node_missing_or_too_old(tmp_dirs):
    empty = tmp_dirs / "empty-bin"
    empty.mkdir()
    out = tui_cli("--runtime-dir", str(tmp_dirs), env={"PATH": str(empty)})
    assert out.returncode == 1, out
    assert out.stderr.strip() == ("hermes-gateway tui: node is not on PATH: the Hermes TUI is a Node program and "
                                  "needs Node ≥ 20.19 (or ≥ 22.7 on the 22 line)")
    old = tmp_dirs / "old-bin"  # an old node stands in for one (none is installed here): it only prints its version
    old.mkdir()
    (old / "node").write_text("#!/bin/sh\necho v18.19.0\n")
    (old / "node").chmod(0o755)
    out = tui_cli("--runtime-dir", str(tmp_dirs), env={"PATH": f"{old}:/usr/bin:/bin"})
    assert out.returncode == 1, out
    assert len(out.stderr.strip().splitlines()) == 1
    assert "is v18.19.0, too old: the Hermes TUI needs Node ≥ 20.19" in out.stderr


def test_hermes_extra_missing_says_how_to_install(tmp_dirs):
    if shutil.which("node") is None:
        pytest.skip("node is not on PATH (it is checked first)")
    # -S: no site-packages, so no hermes-agent: a real interpreter without the extra (the command needs only stdlib)
    out = tui_cli("--runtime-dir", str(tmp_dirs), python_flags=("-S",))
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "the Hermes TUI is not installed" in lines[0] and "make tui" in lines[0]
    assert f"{sys.executable} -m pip install 'hermes-agent==0.19.0'" in lines[0]


# -- the real TUI ------------------------------------------------------------------------------------------------
def _node_below(pane_pid: int) -> psutil.Process:
    def find() -> psutil.Process | None:
        try:
            kids = psutil.Process(pane_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        return next((p for p in kids if "entry.js" in " ".join(p.cmdline())), None)

    return wait_for(find, 20, 0.2, what="node running the TUI bundle")


def _tui_command(gw, home: Path, *extra: str) -> str:
    env = {"HOME": str(home), "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    return "exec env -u HERMES_HOME {} {} tui --runtime-dir {} {}".format(
        " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.quote(str(BIN / "hermes-gateway")),
        shlex.quote(str(gw.runtime_dir)), " ".join(shlex.quote(a) for a in extra))


@pytest.fixture
def terminals():
    t = Terminals()
    yield t
    t.kill_server()


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
@pytest.mark.timeout(120)
def test_tui_throwaway_home_then_own_home_and_resume(gateway_factory, terminals, tmp_dirs):
    gw = gateway_factory()
    bare = tmp_dirs / "bare-home"  # a user with no Hermes at all
    bare.mkdir()
    pane = terminals.open("one", _tui_command(gw, bare))
    node = _node_below(pane)
    env = node.environ()
    home = Path(env["HERMES_HOME"])
    assert home.name.startswith("hermes-tui-home-") and home.is_dir() and not (bare / ".hermes").exists()
    assert env["HERMES_TUI_GATEWAY_URL"] == gw.url and "HERMES_TUI_RESUME" not in env
    terminals.wait_screen("one", r"─ ready │", 40, "the TUI to say ready")
    prompt = f"echo this back {uuid.uuid4().hex[:8]}"
    terminals.type("one", prompt)
    terminals.wait_screen("one", r"┊\s+" + re.escape(prompt), 30, "the echoed reply")
    key = wait_for(lambda: [r["key"] for r in ps_sessions(gw) if r["key"]], 10, what="the session's key")[0]

    terminals.close("one")  # the terminal goes away: the TUI ends and its throwaway home with it
    wait_for(lambda: not psutil.pid_exists(pane) and not node.is_running(), 20, what="the TUI to end")
    wait_for(lambda: not home.exists(), 10, what="the throwaway HERMES_HOME to be removed")

    own = tmp_dirs / "own-home"  # a user with a Hermes of their own: the TUI uses it
    (own / ".hermes").mkdir(parents=True)
    pane = terminals.open("two", _tui_command(gw, own, "--resume", key))
    env = _node_below(pane).environ()
    assert env["HERMES_HOME"] == str(own / ".hermes") and env["HERMES_TUI_RESUME"] == key
    screen = terminals.wait_screen("two", r"┊\s+" + re.escape(prompt), 40, "the resumed session's history")
    assert f"❯ {prompt}" in screen
    terminals.close("two")
    assert (own / ".hermes").is_dir(), "the user's own HERMES_HOME is never removed"
