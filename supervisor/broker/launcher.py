"""The broker's side of the fork server: start it, ask it for workers, hear about their exits.

The zygote is a child of the broker (started from the event-loop thread, so its
PDEATHSIG is tied to the broker's life). Worker exits come from the zygote's
waitpid as messages on the same socket, so a crash is seen within milliseconds
without polling.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from typing import Callable

import msgpack

from supervisor import log


class Spawner:
    def __init__(self, on_spawned: Callable[[bytes, int], None],
                 on_exited: Callable[[int, int], None], on_error: Callable[[bytes, str], None],
                 on_lost: Callable[[], None]) -> None:
        self.preload: list[str] = []  # modules the zygote imports before forking (worker.preload.plan)
        self.env: dict[str, str] = {}  # and what it adds to the environment it inherits
        self.on_spawned = on_spawned
        self.on_exited = on_exited
        self.on_error = on_error
        self.on_lost = on_lost
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._closing = False

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # -P: never put the cwd on sys.path, or a worker/ folder there would be loaded into every worker
        args = [sys.executable, "-P", "-m", "worker.zygote", str(child.fileno())]
        for mod in self.preload:
            args += ["--preload", mod]
        self.proc = subprocess.Popen(args, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env}, start_new_session=False)
        child.close()
        parent.setblocking(False)
        self.sock = parent
        asyncio.get_running_loop().add_reader(parent.fileno(), self._readable)
        log.info("zygote started", pid=self.proc.pid, preload=",".join(self.preload) or "-")

    def spawn(self, ident: bytes, config: dict) -> None:
        if self.sock is None:
            raise RuntimeError("fork server is not running")
        self.sock.send(msgpack.packb({"op": "spawn", "ident": ident, "config": config}, use_bin_type=True))

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
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
                self.on_spawned(msg["ident"], int(msg["pid"]))
            elif op == "exited":
                self.on_exited(int(msg["pid"]), int(msg["status"]))
            elif op == "error":
                self.on_error(msg.get("ident", b""), str(msg.get("message")))

    def _lost(self) -> None:
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        status = self.proc.wait() if self.proc else None
        if not self._closing:
            log.error("zygote exited", pid=self.pid, status=status)
            self.on_lost()

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
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
