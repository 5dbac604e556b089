"""A restart, on the new broker's side: take the descriptors, say `ready`, and on `go` take over the tables.

The successor is started with HERMES_GATEWAY_TAKEOVER naming the descriptors it
inherits (see predecessor.py). Until `go` it binds nothing: a successor that cannot
start (a broken config, an import error) leaves its predecessor serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from protocol import frames
from supervisor import log
from supervisor.broker.broker import Broker
from supervisor.restart import state
from supervisor.restart.channel import ENV, Channel

GO_TIMEOUT = 30.0  # s to wait for the predecessor's tables after `ready`
RELEASE_TIMEOUT = 3.0  # s for the held workers to reconnect to our link


@dataclass
class Takeover:
    channel: Channel
    lock_fd: int
    listen: list[socket.socket]
    zygotes: list[tuple[int, int]]  # (socket fd, pid) of every zygote whose workers we take over
    stderr_fd: int

    @classmethod
    def from_env(cls) -> "Takeover | None":
        """The descriptors a predecessor passed (and the variable removed, so no worker inherits it)."""
        raw = os.environ.pop(ENV, "")
        if not raw:
            return None
        info = json.loads(raw)
        listen = [socket.socket(fileno=fd) for fd in info["listen"]]
        zygotes = [(int(fd), int(pid)) for fd, pid in info["zygotes"]]
        for fd in (info["lock"], info["stderr"], *(fd for fd, _ in zygotes)):
            os.set_inheritable(fd, False)
        return cls(Channel(socket.socket(fileno=info["handover"])), int(info["lock"]), listen, zygotes,
                   int(info["stderr"]))

    async def ready(self) -> dict[str, Any]:
        """Say we can take over; the predecessor's `go` with its tables (HandoverError if it never comes)."""
        await self.channel.send(op="ready", pid=os.getpid())
        go = await self.channel.recv(GO_TIMEOUT)
        if go.get("op") != "go":
            raise RuntimeError(f"unexpected handover message {go.get('op')!r}")
        return go

    async def adopt(self, broker: Broker, tables: dict[str, Any]) -> None:
        """Bind the link, start our own zygote (the code now on disk), adopt the predecessor's workers and
        release them; its lobby and spares are replaced by ours."""
        broker.link.start()
        # our stderr is still the predecessor's relay pipe, which closes when it exits: the zygote and every
        # worker it forks would write into a dead pipe (a BrokenPipeError ended a hermes zygote mid-preload),
        # so it starts with the service's stderr
        relay = os.dup(2)
        os.dup2(self.stderr_fd, 2)
        try:
            broker._start_launcher(broker.cfg.worker_config())
        finally:
            os.dup2(relay, 2)
            os.close(relay)
        for fd, pid in self.zygotes:
            broker.adopt_launcher(fd, pid)
        adopted = state.load(broker, tables, time.monotonic())
        waiting = {w for w, _ in adopted}
        deadline = time.monotonic() + RELEASE_TIMEOUT
        release = frames.pack(frames.RELEASE)
        while waiting and time.monotonic() < deadline:
            for w in list(waiting):
                if broker.link.try_send(w, release):  # it is connected again: it sends what it queued
                    waiting.discard(w)
            if waiting:
                await asyncio.sleep(0.01)
        log.info("restart: workers released", released=len(adopted) - len(waiting),
                 took=round(RELEASE_TIMEOUT - (deadline - time.monotonic()), 3))
        if waiting:
            log.warning("restart: workers did not reconnect in time; their heartbeats decide",
                        pids=",".join(str(w.pid) for w in waiting))
        for w, reason in adopted:
            if reason:
                broker.begin_stop(w, reason)
        broker.start_workers()
        log.info("restart: took over", workers=len(adopted), sessions=len(broker.sessions.sessions),
                 zygotes=",".join(str(pid) for _, pid in self.zygotes))

    async def serving(self) -> None:
        """Tell the predecessor we serve; from now on our stderr is the service's, not its relay pipe."""
        try:
            await self.channel.send(op="serving", pid=os.getpid())
        except OSError:
            pass
        os.dup2(self.stderr_fd, 2)
        os.close(self.stderr_fd)
        self.channel.close()
