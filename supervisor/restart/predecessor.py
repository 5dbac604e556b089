"""A restart, on the running broker's side: start the successor, and once it is ready, hand everything over.

    1. Start the successor (`python -m supervisor.commands.cli` with this process's arguments: the code now
       on disk) with the descriptors it takes over: the listening socket(s), the zygote's socket, the
       single-instance lock, and the handover channel. It loads its config and imports everything, then
       says `ready` — or fails, and this broker goes on serving (the restart answers its reason).
    2. The cut: stop accepting (the successor's copy of the listening socket keeps the port open, new
       connections wait in its backlog), stop the reaper, `hold` every worker and read the link up to
       each one's `held` (so no frame is lost), let the clients' queues drain and close them with 1012,
       make the zygote outlive this process (`adopt`), close the worker link.
    3. Send the tables (supervisor/restart/state.py) with `go`; the successor binds the link, releases
       the workers (they send what they queued, in order) and serves. This process then exits without
       stopping any worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from protocol import frames
from supervisor import log
from supervisor.broker.broker import Broker
from supervisor.broker.table import Worker
from supervisor.clients.front import Front
from supervisor.restart import state
from supervisor.restart.channel import ENV, Channel, HandoverError

READY_TIMEOUT = 60.0  # s the successor has to load its config and code
HOLD_TIMEOUT = 1.0  # s the workers have to answer `hold`
SERVING_TIMEOUT = 15.0  # s the successor has to serve after `go`


@dataclass
class Outcome:  # noqa: D101 (fields say it)
    pid: int  # the successor's
    cut: float  # s from the cut (stop accepting) to `go`
    took: float  # s from the request to the successor serving
    workers: int
    sessions: int
    not_held: list[int] = field(default_factory=list)  # pids that did not answer `hold` in time


async def hand_over(broker: Broker, front: Front, lock_fd: int, notify_env: dict[str, str]) -> Outcome:
    """Raises HandoverError with the successor's reason when it could not start; nothing is cut then."""
    t0 = time.monotonic()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    listening = front.listening()
    zygotes = [z for z in broker.launchers() if z.sock is not None]
    if broker.launcher.sock is None or not listening:
        raise HandoverError("nothing to hand over: the fork server or the listening socket is not up")
    err = os.dup(2)
    inherit = {"handover": theirs.fileno(), "lock": lock_fd, "listen": [s.fileno() for s in listening],
               "zygotes": [[z.sock.fileno(), z.pid] for z in zygotes], "stderr": err}
    fds = [theirs.fileno(), lock_fd, err, *inherit["listen"], *(z.sock.fileno() for z in zygotes)]
    env = {**os.environ, **notify_env, ENV: json.dumps(inherit)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor.commands.cli", *sys.argv[1:]], pass_fds=fds,
                                env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as exc:
        raise HandoverError(f"cannot start the successor: {exc}") from None
    finally:
        theirs.close()
        os.close(err)
    tail: deque[str] = deque(maxlen=20)
    relay = asyncio.get_running_loop().create_task(_relay(proc, tail))
    chan = Channel(ours)
    try:
        hello = await chan.recv(READY_TIMEOUT)
        if hello.get("op") != "ready":
            raise HandoverError(str(hello.get("error") or hello))
    except HandoverError as exc:
        await _bury(proc, relay)
        chan.close()
        why = next((line for line in reversed(tail) if line.strip()), "") or str(exc)
        raise HandoverError(f"the new gateway did not start (status {proc.returncode}): {why}; "
                            "this one goes on serving") from None
    log.info("restart: successor ready; handing over", successor=proc.pid, workers=len(broker.workers))

    # -- the cut: from here on there is no way back -----------------------------------------------------
    cut = time.monotonic()
    try:
        await front.stop_accepting()
        broker.stop_reaper()
        not_held = await _hold_workers(broker)
        for sid, first_unsent in (await front.hand_over_clients()).items():
            broker.sessions.rewind(sid, first_unsent)
        for z in zygotes:  # ours, and those a restart before this one handed to us
            await z.hand_over()
        tables = state.dump(broker, time.monotonic())
        broker.link.close()
        await chan.send(op="go", state=tables, token=front.token)
        go = time.monotonic()
        serving = await chan.recv(SERVING_TIMEOUT)
    except Exception as exc:
        relay.cancel()
        why = str(exc) or type(exc).__name__
        raise HandoverError(f"the new gateway (pid {proc.pid}) failed during the hand-over: {why}; it and the "
                            "sessions are gone, start the gateway again", past_cut=True) from None
    relay.cancel()
    log.info("restart: handed over", successor=proc.pid, cut=round(go - cut, 3), workers=len(tables["workers"]),
             sessions=len(tables["sessions"]), not_held=",".join(map(str, not_held)) or "-")
    return Outcome(pid=int(serving.get("pid") or proc.pid), cut=round(go - cut, 3),
                   took=round(time.monotonic() - t0, 3), workers=len(tables["workers"]),
                   sessions=len(tables["sessions"]), not_held=not_held)


async def _hold_workers(broker: Broker) -> list[int]:
    """`hold` every connected worker and read the link until each answered (or HOLD_TIMEOUT passed)."""
    wanted: set[Worker] = set()
    for w in broker.workers.values():
        if w.ready and w.pid and broker.link.try_send(w, frames.pack(frames.HOLD)):
            wanted.add(w)
    done = asyncio.get_running_loop().create_future()
    held: set[Worker] = set()

    def on_held(w: Worker) -> None:
        held.add(w)
        if wanted <= held and not done.done():
            done.set_result(True)

    broker.on_held = on_held
    if wanted:
        try:
            await asyncio.wait_for(done, HOLD_TIMEOUT)
        except asyncio.TimeoutError:
            pass
    return sorted(w.pid for w in wanted - held)


async def _relay(proc: subprocess.Popen, tail: deque[str]) -> None:
    """The successor's stderr until it serves: to ours (the same log), and the last lines for an error."""
    assert proc.stderr is not None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), proc.stderr)
    while True:
        line = await reader.readline()
        if not line:
            return
        text = line.decode(errors="replace").rstrip("\n")
        tail.append(text)
        print(text, file=sys.stderr, flush=True)


async def _bury(proc: subprocess.Popen, relay: asyncio.Task) -> None:
    if proc.poll() is None:
        proc.kill()
    await asyncio.get_running_loop().run_in_executor(None, proc.wait)
    try:
        await asyncio.wait_for(relay, 1.0)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        relay.cancel()


def describe(outcome: Outcome) -> dict[str, Any]:
    return {"pid": outcome.pid, "cut": outcome.cut, "took": outcome.took, "workers": outcome.workers,
            "sessions": outcome.sessions, "not_held": outcome.not_held}
