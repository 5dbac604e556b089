"""The handover channel between a broker and its successor: msgpack maps over a stream socketpair."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import msgpack

ENV = "HERMES_GATEWAY_TAKEOVER"  # set for the successor: JSON of the descriptors it inherits (see predecessor.py)


class HandoverError(RuntimeError):
    """A restart that could not be done; the message is what `hermes-gateway restart` prints.

    past_cut: it failed after this broker began handing over (the successor died in the middle): there is
    no way back, this broker exits and its workers end with the zygote, as after a SIGKILL."""

    def __init__(self, message: str, past_cut: bool = False) -> None:
        super().__init__(message)
        self.past_cut = past_cut


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 30)

    async def send(self, **msg: Any) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, msgpack.packb(msg, use_bin_type=True))

    async def recv(self, timeout: float) -> dict[str, Any]:
        """The next map; HandoverError on EOF or timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for msg in self._unpacker:
                if isinstance(msg, dict):
                    return msg
            left = deadline - loop.time()
            if left <= 0:
                raise HandoverError(f"no answer within {timeout:g}s")
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), left)
            except asyncio.TimeoutError:
                raise HandoverError(f"no answer within {timeout:g}s") from None
            except OSError as exc:
                raise HandoverError(f"handover channel failed: {exc}") from None
            if not data:
                raise HandoverError("the other side closed the handover channel")
            self._unpacker.feed(data)

    def close(self) -> None:
        self.sock.close()
