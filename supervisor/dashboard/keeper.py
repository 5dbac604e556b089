"""Keeps the dashboard child running: start, wait for its port, restart with backoff, stop with the gateway.

The child is a plain child of the gateway (its process tree): it watches its
parent and takes its PTYs with it when the gateway dies. The keeper also
remembers the child's descendants, so PTYs left by a SIGKILLed child are stopped
before the restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from supervisor import log
from supervisor.dashboard.child import FAILED, READY
from supervisor.dashboard.procs import descendants, kill_all

START_TIMEOUT = 60.0
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
STABLE = 30.0  # a child that ran this long resets the backoff


class DashboardError(RuntimeError):
    """The dashboard could not start; the message is the one-line reason."""


@dataclass
class ChildState:
    pid: int = 0
    port: int = 0
    started_at: float = 0.0
    restarts: int = 0
    reason: str = "starting"
    known: list[tuple[int, int]] = field(default_factory=list)


class DashboardKeeper:
    def __init__(self, env: dict[str, str], public_port: int, pty_ttl: float) -> None:
        self.env = env
        self.public_port = public_port
        self.pty_ttl = pty_ttl
        self.state = ChildState()
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task | None = None

    def base_url(self) -> str | None:
        """Where the proxy sends requests, or None while the child is dead or restarting."""
        return f"http://127.0.0.1:{self.state.port}" if self.state.port else None

    def unavailable(self) -> str:
        return self.state.reason

    async def start(self) -> None:
        """First start: raise DashboardError with the child's reason if it does not come up."""
        await self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="dashboard-keeper")

    async def _spawn(self) -> None:
        env = dict(os.environ)
        env.update(self.env)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "supervisor.dashboard.child", "--public-port", str(self.public_port),
            "--pty-ttl", str(self.pty_ttl), "--parent", str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, env=env)
        self.state.pid = self.proc.pid
        self.state.started_at = time.monotonic()
        try:
            port = await asyncio.wait_for(self._ready(self.proc), START_TIMEOUT)
        except asyncio.TimeoutError:
            port, why = 0, f"did not report its port within {START_TIMEOUT:.0f} s"
        else:
            why = ""
        if isinstance(port, str):
            port, why = 0, port
        if not port:
            await self._kill_child()
            self.state.reason = f"dashboard unavailable: {why or 'the child exited before serving'}"
            raise DashboardError(self.state.reason)
        self.state.port = port
        self.state.reason = ""
        asyncio.get_running_loop().create_task(self._drain(self.proc))
        log.info("dashboard child serving", pid=self.proc.pid, private_port=port)

    @staticmethod
    async def _ready(proc: asyncio.subprocess.Process) -> int | str:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith(READY):
                return int(line.split("port=")[1])
            if line.startswith(FAILED):
                return line[len(FAILED):].strip() or "failed"
        return 0

    @staticmethod
    async def _drain(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            log.debug("dashboard", line=raw.decode(errors="replace").rstrip()[:300])

    async def _watch(self) -> None:
        """Remember the child's descendants; when it dies unasked, stop them and start it again."""
        attempt = 0
        while not self._stopping:
            proc = self.proc
            assert proc is not None
            while proc.returncode is None:
                self.state.known = descendants(proc.pid)
                try:
                    await asyncio.wait_for(proc.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
            if self._stopping:
                return
            left = kill_all(self.state.known)
            self.state.port = 0
            self.state.reason = (f"dashboard restarting: the child exited with {proc.returncode}")
            if time.monotonic() - self.state.started_at > STABLE:
                attempt = 0
            delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
            attempt += 1
            log.error("dashboard child died; restarting", pid=proc.pid, code=proc.returncode,
                      stopped_ptys=left, backoff=delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn()
                self.state.restarts += 1
            except DashboardError as exc:
                log.error("dashboard restart failed", reason=str(exc))

    async def stop(self, timeout: float = 3.0) -> None:
        self._stopping = True
        self.state.port = 0
        self.state.reason = "dashboard unavailable: the gateway is stopping"
        if self._task is not None:
            self._task.cancel()
        await self._kill_child(timeout)

    async def _kill_child(self, timeout: float = 3.0) -> None:
        proc = self.proc
        if proc is None:
            return
        below = descendants(proc.pid) if proc.returncode is None else self.state.known
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        kill_all(below)

    def pids(self) -> list[int]:
        """The child and everything below it (for hermes-ps -a)."""
        if self.proc is None or self.proc.returncode is not None:
            return []
        return [self.proc.pid] + [pid for pid, _ in descendants(self.proc.pid)]
