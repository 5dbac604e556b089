"""The control endpoint: ipc://<runtime-dir>/control.sock, msgpack requests from hermes-ps and operators.

Wire format (one msgpack map per ZeroMQ message; REQ or DEALER+empty-delimiter clients):
  request  {"v": 1, "cmd": "list" | "stats" | "kill" | "drain" | "undrain", ...}
           kill: {"target": session id | stored key | pid, "reason"?: str}
           restart: hand over to a new broker; answers {"restarted": {pid, cut, took, workers, sessions, not_held}}
                    once the new one serves (this one then exits), or an error with the new one's reason
  reply    {"ok": true, ...} or {"ok": false, "error": str}
  list  -> {"gateway": {...stats...}, "workers": [row, ...]}  (row: see `worker_row`)
  stats -> {"gateway": {pid, uptime, started_at, version, accepting, counts, reaps, config, ...}}

The socket lives in the 0700 runtime dir (mode 0600): whoever can open it is the
daemon's own user. It is a ROUTER drained on readability from the broker's event
loop, like the worker link; anything that reads /proc is done in the sampler thread.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

import msgpack
import zmq

from supervisor import log
from supervisor.ops.port import Supervised
from supervisor.ops.sampler import Figures, Sampler

VERSION = 1
MAX_REQUEST = 64 * 1024
REASON = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
DEFAULT_KILL_REASON = "operator_kill"


def with_figures(row: dict[str, Any], fig: Figures | None) -> dict[str, Any]:
    """A worker row (supervisor/broker/views.py) with its process figures from the sampler."""
    f = fig or Figures()
    return row | {"cpu": f.cpu, "rss": f.rss, "uss": f.uss, "threads": f.threads, "fds": f.fds,
                  "children": f.children}


class ControlServer:
    def __init__(self, gateway: Supervised, endpoint: str, sampler: Sampler) -> None:
        self.gateway = gateway
        self.endpoint = endpoint
        self.sampler = sampler
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.path = endpoint[len("ipc://"):]
        self._tasks: set[asyncio.Task] = set()
        self.requests = 0

    # -- start / stop ---------------------------------------------------------
    def start(self) -> None:
        """Bind (we hold the single-instance lock, so a leftover socket file is a dead daemon's)."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.ctx = zmq.Context(io_threads=1)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        old = os.umask(0o177)
        try:
            sock.bind(self.endpoint)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.getsockopt(zmq.FD), self._drain)
        self._drain()
        log.info("control endpoint listening", endpoint=self.endpoint)

    def close(self, unlink: bool = True) -> None:
        """unlink=False after a restart: the path is the successor's socket now."""
        if self.sock is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(self.sock.getsockopt(zmq.FD))
        except (RuntimeError, zmq.ZMQError):
            pass
        for task in list(self._tasks):
            task.cancel()
        self.sock.close(linger=0)
        self.sock = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # -- the socket -----------------------------------------------------------
    def _drain(self) -> None:
        sock = self.sock
        for _ in range(100):
            if sock is None:
                return
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("control receive failed", error=str(exc))
                return
            if len(parts) < 2:
                continue
            envelope, data = parts[:-1], parts[-1]
            self.requests += 1
            task = asyncio.get_running_loop().create_task(self._serve(envelope, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        asyncio.get_running_loop().call_soon(self._drain)

    def _reply(self, envelope: list[bytes], doc: dict) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send_multipart([*envelope, msgpack.packb(doc, use_bin_type=True, default=str)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("control reply dropped", error=str(exc))
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # the FD is edge-triggered
            asyncio.get_running_loop().call_soon(self._drain)

    async def _serve(self, envelope: list[bytes], data: bytes) -> None:
        try:
            req = msgpack.unpackb(data, raw=False, max_str_len=4096,
                                  max_bin_len=4096, max_array_len=64, max_map_len=64)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("a request is a map with a string `cmd`")
            handler = {"list": self.list, "stats": self.stats, "kill": self.kill, "drain": self.drain,
                       "undrain": self.undrain, "restart": self.restart}.get(req["cmd"])
            if handler is None:
                raise ValueError(f"unknown command {req['cmd'][:40]!r} (list, stats, kill, drain, undrain, restart)")
            doc = await handler(req)
            doc["ok"] = True
        except asyncio.CancelledError:
            raise
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            doc = {"ok": False, "error": str(exc) or f"bad request ({type(exc).__name__}): not a msgpack map"}
        except Exception as exc:  # report, never crash the daemon on an operator's request
            log.error("control request failed", error=repr(exc))
            doc = {"ok": False, "error": f"internal error: {exc!r}"}
        doc["v"] = VERSION
        self._reply(envelope, doc)

    # -- commands -------------------------------------------------------------
    async def list(self, req: dict) -> dict:
        await self.sampler.sample(self.gateway.targets())  # fresh memory/threads/fds; CPU% from the background pass
        snap = self.gateway.snapshot()
        figs = self.sampler.figures
        return {"gateway": snap.gateway, "workers": [with_figures(r, figs.get(r["pid"])) for r in snap.workers]}

    async def stats(self, req: dict) -> dict:
        return {"gateway": self.gateway.snapshot().gateway}

    async def kill(self, req: dict) -> dict:
        target = req.get("target")
        reason = req.get("reason") or DEFAULT_KILL_REASON
        if not isinstance(reason, str) or not REASON.match(reason):
            raise ValueError("reason must match [a-z][a-z0-9_]{0,31} (it becomes a metrics label)")
        killed = await self.gateway.kill(target, reason)
        if killed is None:
            raise ValueError(f"no live worker for {str(target)[:80]!r} (give a session id, stored key or pid)")
        return {"killed": killed}

    async def drain(self, req: dict) -> dict:
        """Stop accepting new sessions; live ones run on until their clients leave and the reaper stops them."""
        self.gateway.set_accepting(False)
        return {"accepting": False, "sessions": self.gateway.counts()["sessions"]}

    async def restart(self, req: dict) -> dict:
        """Hand the port and every worker to a new broker running the code on disk (supervisor/restart/)."""
        try:
            return {"restarted": await self.gateway.restart()}
        except RuntimeError as exc:  # HandoverError: the new broker's reason; this one goes on serving
            raise ValueError(str(exc)) from None

    async def undrain(self, req: dict) -> dict:
        if not self.gateway.set_accepting(True):
            raise ValueError("the gateway is shutting down")
        return {"accepting": True, "sessions": self.gateway.counts()["sessions"]}
