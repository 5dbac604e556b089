"""The worker's end of the broker link: one DEALER socket owned by the main thread.

Other threads (turns, slash worker, poller) never touch the socket: they put
frames into an outbox and poke a pipe, and the main loop sends them. Any frame
counts as a heartbeat; an explicit one goes out when nothing else did for an interval.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

import zmq

from protocol import frames

EVENT_BATCH_ITEMS = 512  # events per coalesced frame
EVENT_BATCH_BYTES = 1 << 20  # and bytes of event text per frame (far under frames.MAX_FRAME)


class Link:
    def __init__(self, endpoint: str, ident: bytes, heartbeat_interval: float) -> None:
        self.ctx = zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, ident)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, frames.MAX_FRAME)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)  # a restart's successor binds the link: back within ~10 ms
        self.sock.connect(endpoint)
        self.interval = heartbeat_interval
        self._outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poked = threading.Event()
        self._last_send = 0.0
        self.running = True
        self.held = False  # a restart is handing the link over: queue everything until released

    def post(self, data: bytes) -> None:
        """Thread-safe: queue one frame for the main loop to send."""
        self._outbox.put(data)
        self._wake()

    def post_event(self, seq: int, type_: str, text: bytes) -> None:
        """Thread-safe: queue one session event; consecutive ones leave as one frame (see _flush)."""
        self._outbox.put((seq, type_, text))
        self._wake()

    def drained(self) -> bool:
        """Thread-safe: the main loop has taken everything posted so far (sent, or held by a restart)."""
        return self._outbox.empty()

    def _wake(self) -> None:
        if not self._poked.is_set():
            self._poked.set()
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass

    def hold(self) -> None:
        """Main thread: send what is queued, then `held`, then nothing until release() (heartbeats included).

        The broker that asked drains its socket up to our `held`, so no frame is lost between it and its
        successor; what we queue meanwhile goes to the successor, in order, once it releases us."""
        self._flush()
        self.sock.send(frames.pack(frames.HELD))
        self.held = True

    def release(self) -> None:
        self.held = False
        self._flush()

    def _flush(self) -> None:
        """Send everything queued, in order; runs of events are coalesced (bounded) into one frame each."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        # only now: a post between a clear and the drain above had its wake byte drained while its flag stayed
        # set, so no later post wrote one and the outbox waited for the poll timeout (up to 0.5 s per event)
        self._poked.clear()
        if self.held:
            return  # queued until release(); release() flushes
        events: list = []
        size = 0
        while True:
            try:
                data = self._outbox.get_nowait()
            except queue.Empty:
                break
            if type(data) is tuple:
                if events and size + len(data[2]) > EVENT_BATCH_BYTES:
                    self.sock.send(frames.pack_events(events), copy=False)
                    events, size = [], 0
                events.append(data)
                size += len(data[2])
                if len(events) < EVENT_BATCH_ITEMS:
                    continue
                data = None
            if events:
                self.sock.send(frames.pack_events(events), copy=False)
                events, size = [], 0
            if data is not None:
                self.sock.send(data, copy=False)
            self._last_send = time.monotonic()
        if events:
            self.sock.send(frames.pack_events(events), copy=False)
            self._last_send = time.monotonic()

    def serve(self, on_frame: Callable[[dict], None], heartbeat: Callable[[], bytes],
              tick: Callable[[], None]) -> None:
        """Main loop: receive calls, send what the other threads queued, beat."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while self.running:
            wait = max(0.0, self._last_send + self.interval - time.monotonic())
            ready = dict(poller.poll(min(wait, 0.5) * 1000))  # state changes wake us through the outbox pipe
            if self.sock in ready:
                while True:
                    try:
                        data = self.sock.recv(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    try:
                        frame = frames.unpack(data)
                    except frames.FrameError as exc:
                        print(f"worker: dropped bad frame from broker: {exc}", flush=True)
                        continue
                    on_frame(frame)
            self._flush()
            tick()
            if not self.held and time.monotonic() - self._last_send >= self.interval:
                self.sock.send(heartbeat())
                self._last_send = time.monotonic()
        self.held = False  # stopping: what is queued goes out (to whichever broker has the link)
        self._flush()

    def close(self) -> None:
        self.running = False
        self.sock.close(linger=2000)
        self.ctx.term()
