"""Who gets a socket: the front accepts a connection only when descriptors are left for everyone else.

A TCP connection costs a descriptor the moment it is accepted, before a single byte
says who it is. Under a low RLIMIT_NOFILE, idle connections used to take the last
descriptors, and libzmq, finding none for its next accept, aborted the whole gateway.
So the front accepts by hand, one socket at a time, and only while:
  * descriptors stay free for the rest of the gateway: a fixed reserve (control socket,
    store, worker starts in progress) plus a few per worker slot not yet used;
  * fewer than --max-clients plus --max-handshakes connections are open (the front answers 503
    to a WebSocket client past --max-clients);
and a connection that has not finished its handshake (TLS plus HTTP request head) within
--handshake-timeout is dropped. At most --max-handshakes may be unfinished at once; past that,
or without descriptors to spare, the oldest unfinished one (if older than MIN_HANDSHAKE_AGE) makes
room for the next, so a slow flood cannot keep real clients out. When there is no room
the listening socket is simply not read: the kernel's backlog holds the rest at no cost.
A handshake is evicted only after MIN_HANDSHAKE_AGE, so the backlog drains in turn.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from supervisor import log

# descriptors always left for the broker: control socket peers, the store, pipes of a worker start,
# libzmq's own (its ipc accept aborts the process on EMFILE)
FD_RESERVE = 8
# descriptors the broker holds per worker (its ipc connection, pidfd/psutil reads)
FD_PER_WORKER = 2
FD_MEASURE_EVERY = 1.0  # seconds between counts of /proc/self/fd
FD_RECOUNT_BELOW = 32  # below this much room, count on every accept
# an unfinished handshake is evicted for a newer one only after this long, so every connection
# gets a fair chance to send its request head even in a flood
MIN_HANDSHAKE_AGE = 0.5
RETRY_ACCEPT = 0.1  # seconds before looking at the backlog again when there was no room


def raise_nofile() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (old soft, new soft, hard) and logs them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = soft
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            new = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit", soft=soft, hard=hard, error=str(exc))
    log.info("descriptor limit", soft_was=soft, soft=new, hard=hard)
    return soft, new, hard


def open_fds() -> int | None:
    """Descriptors open in this process; None when even counting them fails (EMFILE: none left)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listdir's own descriptor
    except OSError:
        return None


@dataclass
class Limits:
    max_clients: int
    max_handshakes: int
    handshake_timeout: float


class Admission:
    """Accepts on the front's listening sockets within the limits above and counts what is open."""

    def __init__(self, limits: Limits, protocol_factory: Callable[[], asyncio.BaseProtocol],
                 workers_free: Callable[[], int], ssl_ctx: ssl.SSLContext | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.limits = limits
        self.factory = protocol_factory
        self.workers_free = workers_free  # worker slots not started yet: each will need descriptors
        self.ssl = ssl_ctx
        self.on_refused = on_refused or (lambda _reason: None)
        self.soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.open = 0
        self.pending: OrderedDict[asyncio.BaseTransport, tuple[asyncio.TimerHandle, float]] = OrderedDict()
        self.socks: list[socket.socket] = []
        self._reading: set[int] = set()
        self._others = 0
        self._measured_at = -FD_MEASURE_EVERY
        self._tasks: set[asyncio.Task] = set()
        self.counts: dict[str, int] = {}

    # -- budget ------------------------------------------------------------------
    def fd_room(self) -> int:
        """Descriptors the front may still take. Counted at most once a second while there is plenty of room,
        on every call when it is nearly gone (the broker's own use moves between counts)."""
        now = time.monotonic()
        room = self._room()
        if now - self._measured_at >= FD_MEASURE_EVERY or room < FD_RECOUNT_BELOW:
            self._measured_at = now
            counted = open_fds()
            self._others = self.soft if counted is None else max(0, counted - self.open)
            room = self._room()
        return room

    def _room(self) -> int:
        reserve = FD_RESERVE + FD_PER_WORKER * max(0, self.workers_free())
        return self.soft - reserve - self._others - self.open

    def room(self) -> bool:
        # clients plus handshakes: a client over --max-clients still gets its HTTP 503, not silence
        return self.open < self.limits.max_clients + self.limits.max_handshakes and self.fd_room() > 0

    # -- listening ---------------------------------------------------------------
    def listen(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        for s in socks:
            s.setblocking(False)
        self._resume()

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self.socks:
            if s.fileno() in self._reading:
                loop.remove_reader(s.fileno())
            self._reading.discard(s.fileno())
            s.close()
        self.socks = []

    def _resume(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self.socks:
            if s.fileno() >= 0 and s.fileno() not in self._reading:
                self._reading.add(s.fileno())
                loop.add_reader(s.fileno(), self._accept, s)

    def _pause(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self.socks:
            if s.fileno() in self._reading:
                loop.remove_reader(s.fileno())
                self._reading.discard(s.fileno())

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):  # a bounded batch per wake-up, so the loop keeps serving everyone else
            full = len(self.pending) >= self.limits.max_handshakes
            if full or not self.room():
                # the backlog keeps the rest; an evicted socket frees its descriptor on the next loop turn,
                # and its release, a finished handshake or the retry resumes accepting
                self._pause()
                if not self._evict_oldest("too many unfinished handshakes" if full else "no descriptors to spare"):
                    asyncio.get_running_loop().call_later(RETRY_ACCEPT, self._resume)
                return
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ECONNABORTED: never fatal
                self._count("accept_error")
                log.throttled("accept").warning("accept failed", error=exc.strerror or str(exc), front=self.open,
                                                others=self._others, soft=self.soft)
                self._pause()
                asyncio.get_running_loop().call_later(0.2, self._resume)
                return
            sock.setblocking(False)
            self.open += 1
            task = asyncio.get_running_loop().create_task(self._connect(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: _Counted(self, self.factory()), sock, ssl=self.ssl,
                ssl_handshake_timeout=self.limits.handshake_timeout if self.ssl else None)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            self._count("tls_failed")
            log.throttled("handshake").warning("handshake failed", error=str(exc) or type(exc).__name__)
            sock.close()
            self._release()
            return

    # -- per-connection bookkeeping ------------------------------------------------
    def _made(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.limits.handshake_timeout, self._expire, transport)
        self.pending[transport] = (timer, loop.time())

    def handshake_done(self, transport: asyncio.BaseTransport | None) -> None:
        """The request head arrived: the connection no longer counts as an unfinished handshake."""
        entry = self.pending.pop(transport, None) if transport is not None else None
        if entry is not None:
            entry[0].cancel()
            if self.socks and len(self._reading) < len(self.socks):
                self._resume()

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        if self.pending.pop(transport, None) is not None:
            self._count("handshake_timeout")
            log.throttled("handshake").warning("handshake not finished in time, connection dropped",
                                               timeout=self.limits.handshake_timeout)
            transport.abort()

    def _evict_oldest(self, why: str) -> bool:
        if not self.pending:
            return False
        transport, (timer, since) = next(iter(self.pending.items()))
        if asyncio.get_running_loop().time() - since < MIN_HANDSHAKE_AGE:
            return False
        del self.pending[transport]
        timer.cancel()
        self._count("evicted")
        log.throttled("handshake").warning("unfinished handshake dropped to make room", reason=why)
        transport.abort()
        return True

    def _lost(self, transport: asyncio.BaseTransport) -> None:
        entry = self.pending.pop(transport, None)
        if entry is not None:
            entry[0].cancel()
        self._release()

    def _release(self) -> None:
        self.open -= 1
        if self.socks and len(self._reading) < len(self.socks):
            self._resume()

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        self.on_refused(what)


class _Counted(asyncio.Protocol):
    """Wraps the HTTP server's protocol to tell Admission when a connection opens and ends."""

    def __init__(self, admission: Admission, inner: asyncio.BaseProtocol) -> None:
        self.admission = admission
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.admission._made(transport)
        self.transport = transport
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.admission._lost(self.transport)
