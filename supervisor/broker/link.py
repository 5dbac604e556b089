"""The worker link: the ZeroMQ ROUTER every worker's DEALER connects to, and the calls waiting on it.

Drained on readability from the event loop in bounded batches (no per-message await).
Frames are checked by protocol.frames; a frame from a peer that is not a live worker,
or one that fails the check, is dropped, counted and logged (throttled: a local peer
can provoke it at will). Responses are matched to the pending call they answer and
only the worker the call went to may answer it; every other frame goes to `on_frame`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from protocol import frames, jsonrpc
from supervisor import log
from supervisor.broker.table import Worker

DRAIN_BATCH = 2000  # frames per drain before yielding to other callbacks

Sink = Callable[[str | bytes], None]


@dataclass(slots=True)
class Pending:
    worker: Worker
    method: str
    sink: Sink | None  # None: a notification, the reply is dropped
    on_reply: Callable[[dict], None] | None = None
    client_id: Any = None  # the client's JSON-RPC id: a failure answer must carry it


class WorkerLink:
    def __init__(self, ctx: zmq.Context, endpoint: str, find: Callable[[bytes], Worker | None],
                 on_frame: Callable[[Worker, dict], None], max_queue: Callable[[], int] = lambda: 1000) -> None:
        self.endpoint = endpoint
        self.max_queue = max_queue  # calls that may wait on one worker (the ROUTER itself has no HWM)
        self.find = find  # ident -> live worker
        self.on_frame = on_frame  # every checked frame but a response, from a live worker
        self.router = ctx.socket(zmq.ROUTER)
        self.pending: dict[int, Pending] = {}
        self.waiting: Counter[bytes] = Counter()  # worker ident -> its calls in `pending`
        self.dropped_frames: Counter[str] = Counter()  # why: parts | malformed | unknown_peer | wrong_pid
        self._noisy = log.Throttled()  # what a rogue local peer can provoke at will
        self._rid = itertools.count(1)

    def start(self) -> None:
        sock_path = self.endpoint[len("ipc://"):]
        if os.path.exists(sock_path):
            os.unlink(sock_path)  # we hold the lock: a leftover socket is from a dead broker
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, frames.MAX_FRAME)
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.endpoint)
        os.chmod(sock_path, 0o600)
        asyncio.get_running_loop().add_reader(self.router.getsockopt(zmq.FD), self._drain)

    def close(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.router.getsockopt(zmq.FD))
        except (RuntimeError, zmq.ZMQError):
            pass
        self.router.close(linger=0)

    def drop(self, why: str, message: str, **fields: Any) -> None:
        self.dropped_frames[why] += 1
        self._noisy.warning(message, **fields)

    # -- receiving --------------------------------------------------------------
    def _drain(self) -> None:
        """Read the ROUTER until it is empty (its FD is edge-triggered), in bounded batches."""
        router = self.router
        for _ in range(DRAIN_BATCH):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("router receive failed", error=str(exc))
                return
            if len(parts) != 2:
                self.drop("parts", "dropped frame with unexpected parts", parts=len(parts))
                continue
            ident, data = parts
            try:
                frame = frames.unpack(data)
            except frames.FrameError as exc:
                self.drop("malformed", "dropped bad frame", peer=ident[:40].hex(), error=str(exc))
                continue
            worker = self.find(ident)
            if worker is None:
                self.drop("unknown_peer", "dropped frame from unknown peer", peer=ident[:40].hex(), kind=frame["k"])
                continue
            try:
                if frame["k"] == frames.RES:
                    self._on_response(worker, frame)
                else:
                    self.on_frame(worker, frame)
            except Exception as exc:  # a bug in one frame's handling must not stop the loop
                log.error("frame handling failed", worker=worker.pid, kind=frame["k"], error=repr(exc))
        asyncio.get_running_loop().call_soon(self._drain)

    def _kick(self) -> None:
        """After sending, the FD may have swallowed an edge: check and drain."""
        if self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            asyncio.get_running_loop().call_soon(self._drain)

    def _on_response(self, w: Worker, frame: dict) -> None:
        self.on_frame(w, frame)  # any frame is a beat
        pending = self.pending.get(frame["rid"])
        if pending is None or pending.worker is not w:
            return  # only the worker a call went to may answer it
        self._done(frame["rid"])
        if pending.on_reply is not None:
            pending.on_reply(frame)
        elif pending.sink is not None:
            pending.sink(frame["json"])

    # -- sending ----------------------------------------------------------------
    def send(self, worker: Worker, data: bytes) -> bool:
        try:
            self.router.send_multipart([worker.ident, data], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone
            log.warning("send to worker failed", pid=worker.pid, error=str(exc))
            return False
        finally:
            self._kick()

    def try_send(self, worker: Worker, data: bytes) -> bool:
        """Send if the worker is connected now; False, quietly, if not (a restart's release, retried)."""
        try:
            self.router.send_multipart([worker.ident, data], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False
        finally:
            self._kick()

    def forward(self, w: Worker, method: str, params: dict, client_id: Any, sink: Sink | None,
                on_reply: Callable[[dict], None] | None = None) -> bool:
        """Send a client's call to a worker; its answer goes to `on_reply` (the whole frame) or `sink` (the json).

        A worker with max_queue calls unanswered takes no more: RpcError 4009 naming the limit, and the
        client's connection stays usable (one client flooding a session cannot grow the broker without bound)."""
        queued = self.waiting[w.ident]
        if queued >= self.max_queue():
            raise jsonrpc.RpcError(jsonrpc.SESSION_BUSY, f"the session's worker has {queued} calls waiting "
                                   f"(max_worker_queue={self.max_queue()}); retry once it answers")
        rid = next(self._rid)
        # pack first: params msgpack cannot carry (an integer over 64 bits) raise here, before anything is registered
        data = frames.pack(frames.CALL, rid=rid, id=client_id, method=method, params=params)
        self.pending[rid] = Pending(w, method, sink, on_reply, client_id)
        self.waiting[w.ident] += 1
        ok = self.send(w, data)
        if not ok:
            self._done(rid)
        return ok

    def _done(self, rid: int) -> None:
        p = self.pending.pop(rid, None)
        if p is not None:
            left = self.waiting[p.worker.ident] - 1
            if left > 0:
                self.waiting[p.worker.ident] = left
            else:
                del self.waiting[p.worker.ident]

    def fail_pending(self, w: Worker, why: str) -> None:
        """Answer every call still waiting on a worker that is gone: -32603 with the reason."""
        for rid, p in list(self.pending.items()):
            if p.worker is w:
                self._done(rid)
                text = jsonrpc.error(p.client_id, jsonrpc.INTERNAL_ERROR, why)
                if p.on_reply is not None:
                    p.on_reply({"k": "res", "rid": rid, "json": text.encode(), "failed": why})
                elif p.sink is not None:
                    p.sink(text)
