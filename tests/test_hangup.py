"""Issue 15: SIGHUP ends a gateway in the foreground of a terminal; a service (no terminal, or NOTIFY_SOCKET) reloads.

The terminal is a real pty that the gateway holds as its controlling terminal; closing its master
side is what closing a terminal window does (the kernel sends the SIGHUP).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import termios
import threading
import time
from pathlib import Path

import psutil

from supervisor.ops.hangup import sighup_reloads
from tests.conftest import Gateway, _LIVE, gateway_binary, kill_tree, pid_alive, wait_for


def test_the_rule():
    assert sighup_reloads({}, tty=False, inherited=signal.SIG_DFL)  # systemd without notify, launchd, setsid
    assert not sighup_reloads({}, tty=True, inherited=signal.SIG_DFL)  # a terminal's foreground
    assert sighup_reloads({"NOTIFY_SOCKET": "/run/x"}, tty=True, inherited=signal.SIG_DFL)
    assert sighup_reloads({}, tty=True, inherited=signal.SIG_IGN)  # nohup
    assert not sighup_reloads({"NOTIFY_SOCKET": ""}, tty=True, inherited=signal.SIG_DFL)


class PtyGateway:
    """`hermes-gateway run` with a pty as its controlling terminal and stdio, the output read off the master."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, nohup: bool = False) -> None:
        self.master, slave = os.openpty()
        self.out = bytearray()
        self.closing = threading.Event()
        full = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_GATEWAY_") and k != "NOTIFY_SOCKET"}
        full.update(env or {})
        self.runtime_dir, data_dir = tmp / "run", tmp / "data"
        args = [gateway_binary(), "run", "--port", "0", "--runtime-dir", str(self.runtime_dir),
                "--data-dir", str(data_dir)]
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=full,
                                     start_new_session=True, preexec_fn=_nohup if nohup else _take_terminal)
        os.close(slave)
        self.gw = Gateway(proc=self.proc, runtime_dir=self.runtime_dir, data_dir=data_dir, args=args)
        _LIVE.append(self.gw)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        info = self.runtime_dir / "gateway.json"

        def ready() -> bool:
            assert self.proc.poll() is None, f"gateway exited {self.proc.returncode}:\n{self.text()}"
            return info.exists() and json.loads(info.read_text()).get("pid") == self.proc.pid

        wait_for(ready, 20, what="gateway.json")
        wait_for(lambda: len(self.gw.workers()) >= 1, 10, what="the lobby worker")

    def _read(self) -> None:
        # never blocked in read() when the master is closed: a read in progress would keep the pty open
        while not self.closing.is_set():
            if not select.select([self.master], [], [], 0.05)[0]:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.out += chunk
        os.close(self.master)

    def text(self) -> str:
        return self.out.decode(errors="replace")

    def close_terminal(self) -> None:
        self.closing.set()
        self.reader.join(5)

    def stop(self) -> None:
        kill_tree(self.gw)
        self.close_terminal()


def _take_terminal() -> None:  # in the child, after setsid: stdin (the pty slave) becomes the controlling terminal
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _nohup() -> None:  # what `nohup` does before it execs the command
    _take_terminal()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def test_closing_the_terminal_stops_a_foreground_gateway(tmp_dirs):
    pg = PtyGateway(tmp_dirs)
    try:
        wait_for(lambda: "listening on" in pg.text(), 10, what="the banner on the terminal")
        tree = [pg.gw.process(), *pg.gw.descendants()]
        assert len(tree) >= 3, "gateway, zygote, lobby"
        pg.close_terminal()  # the window closes: the kernel hangs up the terminal's session
        try:
            code = pg.proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the gateway outlived its terminal (SIGHUP taken as reload)") from None
        assert code == 0, f"exit {code}: the drain, not a crash\n{pg.text()}"
        gone, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        assert not (pg.runtime_dir / "gateway.json").exists()
    finally:
        pg.stop()


def test_a_service_reloads_on_sighup_even_with_a_terminal(tmp_dirs):
    """NOTIFY_SOCKET (systemd's Type=notify) means a service, whatever else: SIGHUP is `systemctl reload`."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_dirs / "notify.sock")
    notify.bind(path)
    notify.settimeout(20)
    pg = PtyGateway(tmp_dirs, env={"NOTIFY_SOCKET": path})
    try:
        msgs = b""
        while b"READY=1" not in msgs:
            msgs += notify.recv(4096)
        pg.proc.send_signal(signal.SIGHUP)
        while b"RELOADING=1" not in msgs:
            msgs += notify.recv(4096)
        wait_for(lambda: "SIGHUP: no config file to reload" in pg.text(), 10, what="the reload in the log")
        time.sleep(1.0)
        assert pg.proc.poll() is None and pid_alive(pg.proc.pid)
        assert "the terminal closed" not in pg.text()
    finally:
        pg.stop()
        notify.close()


def test_no_terminal_reloads_on_sighup(gateway_factory):
    """Started without a controlling terminal (as launchd and systemd start it): SIGHUP reloads."""
    gw = gateway_factory()
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: no config file to reload" in gw.log(), 10, what="the reload in the log")
    time.sleep(1.0)
    assert gw.proc.poll() is None
    assert len(gw.workers()) >= 1


def test_nohup_outlives_its_terminal(tmp_dirs):
    """`nohup hermes-gateway run &` asked to survive the hangup: it reloads, and serves on without a terminal."""
    pg = PtyGateway(tmp_dirs, nohup=True)
    try:
        pg.close_terminal()
        time.sleep(2.0)
        assert pg.proc.poll() is None, "a nohup'ed gateway ended with its terminal"
        out = subprocess.run([str(Path(gateway_binary()).parent / "hermes-ps"), "--json", "--runtime-dir",
                              str(pg.runtime_dir)], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr  # still answering, with its log going to a hung-up terminal
    finally:
        pg.stop()
