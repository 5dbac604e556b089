"""The control endpoint: ipc://<runtime-dir>/control.sock, msgpack requests from hermes-ps and operators.

Wire format (one msgpack map per ZeroMQ message; REQ or DEALER+empty-delimiter clients):
  request  {"v": 1, "cmd": "list" | "stats" | "kill" | "drain" | "undrain", ...}
           kill: {"target": session id | stored key | pid, "reason"?: str}
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
import time
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from protocol import __version__
from supervisor import log
from supervisor.dashboard import rows as dashboard_rows
from supervisor.ops.sampler import Figures, Sampler

if TYPE_CHECKING:
    from supervisor.daemon import Daemon
    from supervisor.broker.table import Worker

VERSION = 1
MAX_REQUEST = 64 * 1024
REASON = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
DEFAULT_KILL_REASON = "operator_kill"


def worker_row(w: "Worker", now: float, wall: float, fig: Figures | None) -> dict[str, Any]:
    """What `list` says about one worker: identity, lifecycle, and process figures."""
    s = w.session
    if s is not None:
        detached_for = round(now - s.detached_at, 3) if s.detached_at is not None and not s.attached else None
        idle = 0.0 if w.state in ("working", "waiting") else round(now - s.last_active, 3)
    else:
        detached_for = None
        idle = round(now - w.spawned_at, 3) if w.kind == "spare" else None
    uptime = wall - w.create_time if w.create_time else now - w.spawned_at
    fig = fig or Figures()
    return {
        "session": s.sid if s else "", "key": s.key if s else "", "pid": w.pid, "kind": w.kind,
        "state": w.state, "stopping": w.stopping or "", "attached": len(s.attached) if s else 0,
        "detached_for": detached_for, "idle": idle, "heartbeat_age": round(now - w.last_heartbeat, 3),
        "uptime": round(max(0.0, uptime), 3), "cpu": fig.cpu, "rss": fig.rss, "uss": fig.uss,
        "threads": fig.threads, "fds": fig.fds, "children": fig.children,
        "title": str(w.meta.get("title") or "") if s else "", "model": str(w.meta.get("model") or "") if s else "",
        "message_count": int(w.meta.get("message_count") or 0) if s else 0,
    }


class ControlServer:
    def __init__(self, daemon: "Daemon", sampler: Sampler) -> None:
        self.daemon = daemon
        self.broker = daemon.broker
        self.sampler = sampler
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.path = daemon.paths.control_endpoint[len("ipc://"):]
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
            sock.bind(self.daemon.paths.control_endpoint)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.getsockopt(zmq.FD), self._drain)
        self._drain()
        log.info("control endpoint listening", endpoint=self.daemon.paths.control_endpoint)

    def close(self) -> None:
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
                       "undrain": self.undrain}.get(req["cmd"])
            if handler is None:
                raise ValueError(f"unknown command {req['cmd'][:40]!r} (list, stats, kill, drain, undrain)")
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
    def gateway_info(self) -> dict[str, Any]:
        b, d = self.broker, self.daemon
        now = time.time()
        return {
            "pid": os.getpid(), "version": __version__, "started_at": d.started_at,
            "uptime": round(now - d.started_at, 3), "accepting": b.accepting, "closing": b.closing,
            "counts": b.counts(), "reaps": dict(b.reaps), "runtime_dir": d.paths.root,
            "port": d.front.port if d.front else None, "host": d.cfg.host,
            "config": d.cfg.public(), "stops": sum(b.reaps.values()),
            "dropped_frames": dict(b.dropped_frames),
        }

    def targets(self) -> list[tuple[int, float]]:
        return [(w.pid, w.create_time) for w in self.broker.workers.values() if w.pid] + \
            dashboard_rows.targets(self.daemon.dashboard)

    async def list(self, req: dict) -> dict:
        await self.sampler.sample(self.targets())  # fresh memory/threads/fds; CPU% from the background pass
        now, wall = time.monotonic(), time.time()
        figs = self.sampler.figures
        rows = [worker_row(w, now, wall, figs.get(w.pid)) for w in list(self.broker.workers.values())]
        rows += dashboard_rows.rows(self.daemon.dashboard, wall, figs)
        return {"gateway": self.gateway_info(), "workers": rows}

    async def stats(self, req: dict) -> dict:
        return {"gateway": self.gateway_info()}

    async def kill(self, req: dict) -> dict:
        target = req.get("target")
        reason = req.get("reason") or DEFAULT_KILL_REASON
        if not isinstance(reason, str) or not REASON.match(reason):
            raise ValueError("reason must match [a-z][a-z0-9_]{0,31} (it becomes a metrics label)")
        w = self._find(target)
        if w is None:
            raise ValueError(f"no live worker for {str(target)[:80]!r} (give a session id, stored key or pid)")
        s = w.session
        log.info("operator kill", session=s.sid if s else "", pid=w.pid, kind=w.kind, reason=reason)
        t0 = time.monotonic()
        await self.broker.stop(w, reason)
        return {"killed": {"session": s.sid if s else "", "key": s.key if s else "", "pid": w.pid, "kind": w.kind,
                           "reason": w.stopping or reason, "took": round(time.monotonic() - t0, 3)}}

    def _find(self, target: Any) -> "Worker | None":
        b = self.broker
        if isinstance(target, str) and target:
            s = b.find(target)
            if s is not None:
                return s.worker
            if target.isdigit():
                target = int(target)
        if isinstance(target, int) and not isinstance(target, bool):
            return b.by_pid.get(target)
        return None

    async def drain(self, req: dict) -> dict:
        """Stop accepting new sessions; live ones run on until their clients leave and the reaper stops them."""
        if self.broker.accepting:
            log.info("draining: new sessions are refused", sessions=len(self.broker.sessions))
        self.broker.accepting = False
        self.broker.on_change()
        return {"accepting": False, "sessions": len(self.broker.sessions)}

    async def undrain(self, req: dict) -> dict:
        if self.broker.closing:
            raise ValueError("the gateway is shutting down")
        if not self.broker.accepting:
            log.info("accepting new sessions again")
        self.broker.accepting = True
        self.broker.refill()
        self.broker.on_change()
        return {"accepting": True, "sessions": len(self.broker.sessions)}
