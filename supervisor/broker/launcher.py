"""How the pool starts and ends worker processes: a small interface and its one implementation, the zygote.

The pool asks a `Launcher` to launch a worker for an ident and hears back through
`LaunchEvents`: launched (pid), failed, exited (status), lost (the launcher itself
died and took its workers). Signals go to a worker's whole process group, so
whatever it started goes with it. jupyter_client's kernel provisioner is the model;
docs/scaling.md says what a second launcher (pods, remote hosts) would change.

This is the only module of supervisor/ that names worker code (`worker.preload`,
`worker.hermes.slash_fork`, `python -m worker.zygote`).
"""

from __future__ import annotations

import asyncio
import os
import signal as signals
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Protocol

import msgpack
import psutil

from supervisor import log


@dataclass(frozen=True, slots=True)
class LaunchEvents:
    launched: Callable[[bytes, int], None]  # (ident, pid): forked; it will connect and say hello
    failed: Callable[[bytes, str], None]  # (ident, why): never started
    exited: Callable[[int, int], None]  # (pid, status): reaped; -N for death by signal N
    lost: Callable[[], None]  # the launcher itself is gone, and every worker it started with it


class Launcher(Protocol):
    """launch, signal, wait (through `LaunchEvents.exited`), kill."""

    @property
    def pid(self) -> int:
        """The launcher's own process (journaled, so a new broker can clean up after a dead one); 0 if none."""

    def start(self, worker_config: dict) -> None:
        """Get ready to launch workers of this configuration (raises OSError when it cannot)."""

    def launch(self, ident: bytes, config: dict) -> None:
        """Start one worker; raises RuntimeError/OSError at once when the request cannot be made."""

    def signal(self, pid: int, sig: int, alive: bool = True) -> None:
        """Signal the worker's process group; `alive` (not yet reaped) also reaches a worker not yet leading one."""

    def kill(self, pid: int) -> None:
        """SIGKILL the worker's group now (a worker launched after it was given up, a dead launcher's)."""

    def close(self) -> None:
        """Stop launching; the launcher's own process ends and takes what is left of its workers."""


class ZygoteLauncher:
    """Workers forked by a preloaded fork server (worker/zygote.py), a child of the broker.

    Started from the event-loop thread, so its PDEATHSIG is tied to the broker's life. Worker
    exits come from the zygote's waitpid as messages on the same socketpair, so a crash is seen
    within milliseconds without polling.
    """

    def __init__(self, events: LaunchEvents) -> None:
        self.events = events
        self.preload: list[str] = []  # modules the zygote imports before forking (worker.preload.plan)
        self.env: dict[str, str] = {}  # and what it adds to the environment it inherits
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._closing = False
        self._adopted_pid = 0  # a predecessor's zygote: not our child (no Popen), watched by its socket
        self._adopt_ack: asyncio.Future | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else self._adopted_pid

    @classmethod
    def adopt(cls, events: LaunchEvents, fd: int, pid: int) -> "ZygoteLauncher":
        """A restart's successor takes over its predecessor's zygote (socket fd inherited across exec)."""
        launcher = cls(events)
        launcher._adopted_pid = pid
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        launcher.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), launcher._readable)
        return launcher

    async def hand_over(self, timeout: float = 2.0) -> int:
        """A restart, on the predecessor's side: make the zygote outlive this broker, then stop reading its
        socket (its later reports are the successor's). Returns the socket's fd for the successor."""
        assert self.sock is not None
        self._adopt_ack = asyncio.get_running_loop().create_future()
        self.sock.send(msgpack.packb({"op": "adopt"}, use_bin_type=True))
        await asyncio.wait_for(self._adopt_ack, timeout)
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        return self.sock.fileno()

    def start(self, worker_config: dict | None = None) -> None:
        if worker_config is not None:
            from worker import preload  # what to preload is the worker side's knowledge

            self.preload, self.env = preload.plan(worker_config)
        self._sweep()
        self._closing = False
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # -P: never put the cwd on sys.path, or a worker/ folder there would be loaded into every worker
        args = [sys.executable, "-P", "-m", "worker.zygote", str(child.fileno())]
        for mod in self.preload:
            args += ["--preload", mod]
        try:
            self.proc = subprocess.Popen(args, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env}, start_new_session=False)
        finally:
            child.close()
        parent.setblocking(False)
        self.sock = parent
        asyncio.get_running_loop().add_reader(parent.fileno(), self._readable)
        log.info("zygote started", pid=self.proc.pid, preload=",".join(self.preload) or "-")

    def launch(self, ident: bytes, config: dict) -> None:
        if self.sock is None:
            raise RuntimeError("fork server is not running")
        self.sock.send(msgpack.packb({"op": "spawn", "ident": ident, "config": config}, use_bin_type=True))

    def signal(self, pid: int, sig: int, alive: bool = True) -> None:
        if not pid:
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            if alive:  # forked but not yet its own group leader; never after the pid was reaped
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        except PermissionError as exc:
            log.error("cannot signal worker group", pid=pid, error=str(exc))

    def kill(self, pid: int) -> None:
        self.signal(pid, signals.SIGKILL)

    def _readable(self) -> None:
        while self.sock is not None:  # a report handled below may close us (the last adopted worker gone)
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            try:
                msg = msgpack.unpackb(data, raw=False)
            except Exception:
                log.warning("zygote sent an undecodable message", size=len(data))
                continue
            op = msg.get("op") if isinstance(msg, dict) else None
            if op == "spawned":
                self.events.launched(msg["ident"], int(msg["pid"]))
            elif op == "exited":
                self.events.exited(int(msg["pid"]), int(msg["status"]))
            elif op == "error":
                self.events.failed(msg.get("ident", b""), str(msg.get("message")))
            elif op == "adopted" and self._adopt_ack is not None and not self._adopt_ack.done():
                self._adopt_ack.set_result(True)
                return  # whatever follows is the successor's to read

    def _lost(self) -> None:
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        status = self.proc.wait() if self.proc else _wait_gone(self._adopted_pid)
        self._sweep()
        if not self._closing:
            log.error("zygote exited", pid=self.pid, status=status)
            self.events.lost()

    def _sweep(self) -> None:
        """A SIGKILLed zygote cannot unlink its slash-worker socket (worker/hermes/slash_fork.py): remove what the dead
        left in the runtime dir."""
        from worker.hermes import slash_fork

        folder = self.env.get(slash_fork.SOCKET_DIR_ENV)
        if folder:
            for name in slash_fork.sweep(folder):
                log.info("removed a dead fork server's socket", file=name)

    def close(self) -> None:
        """Closing our end makes the zygote exit; its idle children follow it."""
        self._closing = True
        if self.sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            except RuntimeError:
                pass
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                if self.proc.poll() is None:  # one still preloading reads no EOF; its SIGTERM ends it the same way
                    self.proc.terminate()
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self._adopted_pid:  # not our child: nothing to wait for (init reaps it); its workers are gone
            try:
                os.kill(self._adopted_pid, signals.SIGTERM)  # it may still have the predecessor's copy of the socket
            except ProcessLookupError:
                pass


def create_time(pid: int) -> float:
    """A process's start time: with its pid, what tells it from a later process given the same pid."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _wait_gone(pid: int, timeout: float = 2.0) -> int | None:
    """Wait for a process that is not our child (a predecessor's zygote) to end; SIGKILL it after timeout."""
    try:
        proc = psutil.Process(pid)
        return proc.wait(timeout)
    except psutil.TimeoutExpired:
        try:
            proc.kill()
            return proc.wait(1.0)
        except psutil.Error:
            return None
    except psutil.Error:
        return None


def hermes_home_environment(worker_config: dict) -> dict[str, str]:
    """The HERMES_HOME a worker of this configuration sees (worker/hermes/home.py prepares it): what the
    dashboard child must see too, so its TUIs and the workers share one Hermes configuration."""
    from worker.hermes.home import prepare

    return prepare(worker_config)
