"""A real terminal for tests: a tmux server on a private socket, one window per command, all killed at the end."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import time

import psutil

from tests.conftest import wait_for
from tests.procs import kill_all

_sockets = itertools.count()


class Terminals:
    """Each `open()` is a 120x40 terminal running a shell command, as a user's terminal window would."""

    def __init__(self) -> None:
        self.sock = f"hg-term-{os.getpid()}-{next(_sockets)}"
        self.started = False
        self.panes: list[int] = []

    def tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, timeout=10)
        if out.returncode:
            raise AssertionError(f"tmux {' '.join(args[:3])}… failed: {out.stderr.strip()}")
        return out.stdout

    def open(self, name: str, command: str, cwd: str | None = None) -> int:
        """Start `command` (through sh) in a new terminal `name`; returns the pane's pid."""
        if not self.started:  # keeps the server up between terminals
            self.tmux("new-session", "-d", "-s", "keep", "-x", "120", "-y", "40", "sleep 3600")
            self.started = True
        self.tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "40", *(["-c", cwd] if cwd else []), command)
        pid = int(self.tmux("display-message", "-p", "-t", name, "#{pane_pid}").strip())
        self.panes.append(pid)
        return pid

    def screen(self, name: str) -> str:
        try:
            return self.tmux("capture-pane", "-p", "-t", name)
        except AssertionError:
            return ""

    def type(self, name: str, text: str) -> None:
        self.tmux("send-keys", "-t", name, "-l", text)
        time.sleep(0.3)
        self.tmux("send-keys", "-t", name, "Enter")  # in its own send-keys, or it only reaches the composer

    def close(self, name: str) -> None:
        """Close the terminal window: the pty goes away and its processes get SIGHUP from the kernel."""
        subprocess.run(["tmux", "-L", self.sock, "kill-session", "-t", name], capture_output=True, timeout=10)

    def wait_screen(self, name: str, pattern: str, timeout: float, what: str) -> str:
        def match() -> str | None:
            screen = self.screen(name)
            return screen if re.search(pattern, screen) else None

        try:
            return wait_for(match, timeout, 0.2, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {name} ---\n{self.screen(name)}") from None

    def kill_server(self) -> None:
        """Close every terminal; whatever ran in them has 1 s to end on its SIGHUP, then is killed (the tests
        check a clean end themselves where it matters; node takes ~4 s to notice its terminal went)."""
        procs = []
        for pid in self.panes:
            try:
                pane = psutil.Process(pid)
                procs += [pane, *pane.children(recursive=True)]
            except psutil.Error:
                pass
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10)
        _, alive = psutil.wait_procs(procs, timeout=1)
        kill_all(alive)
