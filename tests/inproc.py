"""A broker inside the test process, with a real zygote and real workers (uvicorn's run_server is the model).

Nothing is faked: the broker binds its ROUTER in a temporary runtime dir, starts the
fork server as a child of the test process and forks real workers. The context
manager shuts it down through the stop ladder, and kills whatever is left of its
process tree even when the test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import psutil
import zmq

from protocol import jsonrpc
from supervisor.broker.broker import Broker
from supervisor.clients.gateway import Gateway
from supervisor.config import Config
from supervisor.ops.journal import Journal
from supervisor.paths import RuntimePaths
from tests.procs import kill_all


@dataclass(eq=False)
class Client:
    """A connected client as the broker sees one, keeping what it was sent (decoded)."""

    id: int
    closed: bool = False
    got: list[dict] = field(default_factory=list)

    def send(self, data: str | bytes) -> None:
        self.got.append(json.loads(data))

    def events(self, type_: str | None = None) -> list[dict]:
        return [m["params"] for m in self.got if m.get("method") == "event"
                and (type_ is None or m["params"].get("type") == type_)]


@dataclass
class Running:
    broker: Broker
    gateway: Gateway
    _ids: int = 0

    def client(self) -> Client:
        self._ids += 1
        c = Client(self._ids)
        self.broker.sessions.connect(c)
        return c

    async def call(self, client: Client, method: str, **params: Any) -> dict:
        """One JSON-RPC call through the gateway's router, as the front makes it; the answer, decoded."""
        answer: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        req = jsonrpc.validate({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        await self.gateway.call(client, req, lambda data: answer.done() or answer.set_result(json.loads(data)))
        return await asyncio.wait_for(answer, 10)


@contextlib.asynccontextmanager
async def running_broker(**overrides: Any) -> AsyncIterator[Running]:
    with tempfile.TemporaryDirectory(prefix="hg-inproc-") as tmp:
        values: dict[str, Any] = dict(runtime_dir=os.path.join(tmp, "run"), data_dir=os.path.join(tmp, "data"),
                                      persist=False, warm_pool=1, heartbeat_interval=0.2, stop_timeout=1.0)
        values.update(overrides)
        cfg = Config(**values)
        paths = RuntimePaths(cfg.runtime_dir)
        paths.ensure()
        os.makedirs(cfg.data_dir, mode=0o700, exist_ok=True)
        ctx = zmq.Context(io_threads=1)
        broker = Broker(cfg, paths, Journal(os.path.join(cfg.data_dir, "workers.json")), ctx=ctx)
        me = psutil.Process()
        try:
            await broker.start()
            assert await broker.lobby_ready(10), "the lobby did not register"
            yield Running(broker, Gateway(broker))
        finally:
            try:
                await asyncio.wait_for(broker.shutdown(), 10)
            finally:
                kill_all(me.children(recursive=True))
                ctx.term()


def run(coro: Any) -> Any:
    return asyncio.run(coro)
