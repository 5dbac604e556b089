"""Shapes the client's JSON in the worker and hands frames to the link; numbers events (`seq`)."""

from __future__ import annotations

import json
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from protocol import frames, jsonrpc
from protocol.jsonrpc import RpcError
from worker.link import Link


LINK_BUDGET = frames.MAX_FRAME - 64 * 1024  # room for the frame's own fields


def _id_of(text: str) -> Any:
    try:
        return json.loads(text).get("id")
    except ValueError:
        return None


class Channel:
    def __init__(self, link: Link) -> None:
        self.link = link
        self.sid = ""
        self.seq = 0
        self._lock = threading.Lock()

    def emit(self, type_: str, payload: dict | None = None) -> None:
        """Thread-safe: one session event, numbered in the order it was emitted."""
        with self._lock:
            self.seq += 1
            data = jsonrpc.event(type_, self.sid, payload, self.seq).encode()
            if len(data) > LINK_BUDGET:  # the link would drop this worker for it: say so instead
                data = jsonrpc.event("error", self.sid, {"message": f"a {type_} event of {len(data)} bytes was "
                                                          "too large to deliver"}, self.seq).encode()
            self.link.post_event(self.seq, type_, data)

    def emit_params(self, params: dict) -> None:
        """Thread-safe: an event a hosted runtime already shaped (its `params`), numbered here with `seq`."""
        with self._lock:
            self.seq += 1
            params = {**params, "seq": self.seq}
            text = json.dumps({"jsonrpc": "2.0", "method": "event", "params": params},
                              separators=(",", ":"), ensure_ascii=False, default=str)
            self.link.post_event(self.seq, str(params.get("type", "")), text.encode())

    def respond(self, rid: int, text: str, bind: dict | None = None) -> None:
        data = text.encode()
        if len(data) > LINK_BUDGET:  # the link would drop this worker for it: answer with an error instead
            data = jsonrpc.error(_id_of(text), jsonrpc.INTERNAL_ERROR,
                                 f"the response of {len(data)} bytes exceeds the gateway's link limit").encode()
        fields: dict[str, Any] = {"rid": rid, "json": data}
        if bind is not None:
            fields["bind"] = bind
        self.link.post(frames.pack(frames.RES, **fields))


@dataclass(slots=True)
class Call:
    """One client call forwarded by the broker; answer it exactly once, from any thread."""

    channel: Channel
    rid: int
    id: Any
    method: str
    params: dict
    answered: bool = False

    def reply(self, result: Any, bind: dict | None = None) -> None:
        if not self.answered:
            self.answered = True
            self.channel.respond(self.rid, jsonrpc.result(self.id, result), bind)

    def fail(self, code: int, message: str) -> None:
        if not self.answered:
            self.answered = True
            self.channel.respond(self.rid, jsonrpc.error(self.id, code, message))

    def fail_with(self, exc: RpcError) -> None:
        self.fail(exc.code, exc.message)


def dispatch(handlers: dict[str, Callable[[Call], None]], call: Call) -> None:
    """Run one call's handler; every failure becomes that call's JSON-RPC error and nothing else."""
    from worker.store import StoreError

    handler = handlers.get(call.method)
    if handler is None:
        call.fail(jsonrpc.METHOD_NOT_FOUND, f"unknown method: {call.method}")
        return
    try:
        handler(call)
    except RpcError as exc:
        call.fail_with(exc)
    except StoreError as exc:
        call.fail(jsonrpc.STORE_UNAVAILABLE, f"session store unavailable: {exc}")
    except Exception as exc:  # one bad call answers -32603 and nothing else is affected
        traceback.print_exc()
        call.fail(jsonrpc.INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
