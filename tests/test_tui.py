"""Issue 7, test 3: the real client — hermes-agent 0.19.0's bundled Node TUI — under tmux, against this gateway.

For each runtime: a typed prompt renders the reply in the captured pane; then the TUI
is killed and restarted ten times (what a refresh does to a session: it is dropped
without a `session.close` and a new one is created), and once `reap_grace` has passed
`hermes-ps` shows exactly one session, attached, and the footer says "1 session".
Skips, saying why, where node, tmux or hermes-agent are missing (`make test` installs them).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_for
from tests.fake_openai import FakeOpenAI

RESTARTS = 10
REAP_GRACE = 2.0


def _entry_js() -> Path | None:
    spec = importlib.util.find_spec("hermes_cli")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tui_dist" / "entry.js"
    return path if path.exists() else None


def _skip_reason() -> str | None:
    if _entry_js() is None:
        return "hermes-agent (which bundles the TUI, hermes_cli/tui_dist/entry.js) is not installed: make test installs it"
    if shutil.which("node") is None:
        return "node is not on PATH: the Hermes TUI is a Node program"
    if shutil.which("tmux") is None:
        return "tmux is not installed (make test installs it with apt-get when run as root)"
    return None


pytestmark = [pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
              pytest.mark.timeout(150)]
_sockets = itertools.count()


class Tui:
    """One tmux server on a private socket, running the TUI in a 120x40 pane; kills all it started."""

    def __init__(self, tmp: Path, url: str) -> None:
        self.sock = f"hg-tui-{os.getpid()}-{next(_sockets)}"
        self.url = url
        self.home = tmp / "tui-home"
        self.home.mkdir(exist_ok=True)
        self.stderr = tmp / "tui.stderr"
        self.pids: list[int] = []
        self.current = ""

    def tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, timeout=10)
        if out.returncode:
            raise AssertionError(f"tmux {' '.join(args[:3])}… failed: {out.stderr.strip()}")
        return out.stdout

    def start(self) -> int:
        if not self.pids:  # one tmux server for the whole test, kept up by an idle session between TUIs
            self.tmux("new-session", "-d", "-s", "keep", "-x", "120", "-y", "40", "sleep 3600")
        self.current = f"tui{len(self.pids)}"
        env = {"HERMES_HOME": str(self.home), "HERMES_TUI_GATEWAY_URL": self.url}
        command = "exec env {} {} {} 2>>{}".format(
            " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.quote(shutil.which("node") or "node"),
            shlex.quote(str(_entry_js())), shlex.quote(str(self.stderr)))
        self.tmux("new-session", "-d", "-s", self.current, "-x", "120", "-y", "40", command)
        pid = int(self.tmux("display-message", "-p", "-t", self.current, "#{pane_pid}").strip())
        self.pids.append(pid)  # `exec`: the pane's process is node itself
        return pid

    def screen(self) -> str:
        try:
            return self.tmux("capture-pane", "-p", "-t", self.current)
        except AssertionError:
            return ""

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.current, "-l", text)
        time.sleep(0.3)
        self.tmux("send-keys", "-t", self.current, "Enter")  # in its own send-keys, or it only reaches the composer

    def kill(self) -> None:
        """SIGKILL the TUI, like a closed terminal: it never says goodbye to the gateway."""
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["tmux", "-L", self.sock, "kill-session", "-t", self.current], capture_output=True,
                       timeout=10)

    def close(self) -> None:
        self.kill()
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10)

    def wait_ready(self, timeout: float = 40) -> str:
        """The status bar says `ready` once the TUI has its session and the agent is built."""
        return self.wait_screen(r"─ ready │", timeout, "the TUI to say ready")

    def wait_screen(self, pattern: str, timeout: float, what: str) -> str:
        def match() -> str | None:
            screen = self.screen()
            return screen if re.search(pattern, screen) else None

        try:
            return wait_for(match, timeout, 0.2, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- pane ---\n{self.screen()}\n--- stderr ---\n{self._tail()}") from None

    def _tail(self) -> str:
        return self.stderr.read_text()[-500:] if self.stderr.exists() else ""


@pytest.fixture
def tui_factory(tmp_dirs):
    made: list[Tui] = []

    def make(url: str) -> Tui:
        t = Tui(tmp_dirs, url)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def ps_sessions(gw) -> list[dict]:
    out = subprocess.run([str(Path(sys.executable).parent / "hermes-ps"), "--json", "--runtime-dir",
                          str(gw.runtime_dir)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return [r for r in json.loads(out.stdout)["workers"] if r["kind"] == "session"]


def slash_workers(gw) -> list[int]:
    out = []
    for p in gw.descendants():
        try:
            if "tui_gateway.slash_worker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("runtime", ["builtin", "hermes"])
def test_real_tui_renders_the_reply_and_refreshes_leave_one_session(runtime, gateway_factory, tui_factory):
    if runtime == "hermes" and importlib.util.find_spec("tui_gateway") is None:
        pytest.skip("hermes-agent is not installed")
    marker = uuid.uuid4().hex[:8]
    with FakeOpenAI(reply=f"Hello from the fake model {marker}.") as fake:
        flags = ["--reap-grace", str(REAP_GRACE), "--list-grace", "1"]
        if runtime == "hermes":
            flags += ["--runtime", "hermes", "--openai-base-url", fake.base_url, "--openai-model", "fake-model"]
            prompt, reply = "say hello", f"Hello from the fake model {marker}."
        else:
            prompt = reply = f"echo this back {marker}"  # the echo agent's reply is the prompt
        gw = gateway_factory(*flags)
        tui = tui_factory(gw.url)
        tui.start()
        tui.wait_ready()
        tui.type(prompt)
        screen = tui.wait_screen(r"┊\s+" + re.escape(reply), 40, "the reply in the pane")
        assert f"❯ {prompt}" in screen
        assert "error:" not in screen, screen  # the TUI prints every failed call it cares about
        first_slash: list[int] = []
        if runtime == "hermes":  # the TUI's /tools goes to slash.exec: Hermes' slash worker starts for it
            tui.type("/tools")
            first_slash = wait_for(lambda: slash_workers(gw), 40, 0.2, what="a slash worker for the TUI's /tools")

        for _ in range(RESTARTS):
            tui.kill()
            tui.start()
            tui.wait_ready()

        def one_attached() -> list[dict] | None:
            rows = ps_sessions(gw)
            return rows if len(rows) == 1 and rows[0]["attached"] == 1 else None

        rows = wait_for(one_attached, REAP_GRACE + 20, 0.5, what="hermes-ps to show one attached session")
        assert list(gw.session_workers()) == [rows[0]["pid"]]
        # each refreshed-away session was reaped (the log line follows the exit by a moment)
        wait_for(lambda: gw.log().count("reason=ws_orphan_reap") == RESTARTS, 5, what=f"{RESTARTS} reaps logged")
        tui.wait_screen(r"│ 1 session\b", 10, "the footer to say 1 session")
        if runtime == "hermes":  # no slash worker outlives its session
            live = set(slash_workers(gw))
            assert not live & set(first_slash), "the refreshed-away session's slash worker is still there"
            assert all(os.getpgid(pid) == rows[0]["pid"] for pid in live)
