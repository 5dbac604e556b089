"""A small asyncio TCP proxy placed between test clients and the gateway, to inject socket faults.

Modes can be switched while connections are open:
  latency      every chunk is delayed by `latency` seconds (order kept)
  blackhole    nothing is forwarded any more, both sockets stay open (a dead network)
  cut_after    the gateway->client stream is cut (both sides closed) after N more bytes
  reset        every connection is dropped with an RST both ways (SO_LINGER 0)
  half_close   a FIN is sent to the gateway; the gateway->client direction stays open
Loopback only; one asyncio loop (the test's).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field


@dataclass(eq=False)
class Pipe:
    """One proxied connection: the client side and the gateway (upstream) side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    down_bytes: int = 0  # gateway -> client, forwarded so far
    cut_at: int | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    dead: bool = False


def _linger0(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


class Proxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.port = 0
        self.latency = 0.0
        self.pipes: list[Pipe] = []
        self.accepted = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> "Proxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def via(self) -> dict:
        """Keyword arguments for websockets' connect(): TCP to the proxy, Host header still the gateway's
        (the gateway only accepts its own loopback host:port, as behind any TCP-level forwarder)."""
        return {"host": "127.0.0.1", "port": self.port}

    @property
    def live(self) -> list[Pipe]:
        return [p for p in self.pipes if not p.dead]

    # -- faults ---------------------------------------------------------------
    def blackhole(self, on: bool = True) -> None:
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def cut_after(self, nbytes: int) -> None:
        for p in self.live:
            p.cut_at = p.down_bytes + nbytes

    def reset(self) -> int:
        """RST every open connection, both ways; returns how many were reset."""
        pipes = self.live
        for p in pipes:
            self._drop(p, rst=True)
        return len(pipes)

    def half_close(self) -> int:
        """FIN toward the gateway on every open connection (the client keeps its socket)."""
        pipes = self.live
        for p in pipes:
            if p.upstream.can_write_eof():
                p.upstream.write_eof()
        return len(pipes)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for p in self.pipes:
            self._drop(p, rst=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- plumbing -------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _linger0(writer)
            writer.transport.abort()
            return
        pipe = Pipe(client=writer, upstream=up_writer)
        self.pipes.append(pipe)
        pipe.tasks = [asyncio.create_task(self._pump(pipe, reader, up_writer, down=False)),
                      asyncio.create_task(self._pump(pipe, up_reader, writer, down=True))]

    async def _pump(self, pipe: Pipe, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, down: bool) -> None:
        try:
            while not pipe.dead:
                data = await reader.read(65536)
                if self.latency:
                    await asyncio.sleep(self.latency)
                await self._flowing.wait()
                if pipe.dead:
                    return
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()  # pass a half-close on
                    return
                if down and pipe.cut_at is not None:
                    room = pipe.cut_at - pipe.down_bytes
                    if room <= len(data):
                        writer.write(data[:max(0, room)])
                        pipe.down_bytes += max(0, room)
                        self._drop(pipe, rst=False)
                        return
                writer.write(data)
                if down:
                    pipe.down_bytes += len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            if self._flowing.is_set():
                self._drop(pipe, rst=True)  # pass a reset on (a blackhole passes nothing)
        except asyncio.CancelledError:
            pass

    def _drop(self, pipe: Pipe, rst: bool) -> None:
        if pipe.dead:
            return
        pipe.dead = True
        for w in (pipe.client, pipe.upstream):
            if rst:
                _linger0(w)
                w.transport.abort()
            else:
                w.close()
        current = asyncio.current_task()
        for t in pipe.tasks:
            if t is not current:
                t.cancel()
