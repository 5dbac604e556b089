"""Broker <-> worker frames: one msgpack map per ZeroMQ message, defined once here.

Worker -> broker
  hello  {pid, kind, meta?, caps?}            register (kind: lobby | spare); meta: protocol.lifecycle.WorkerMeta;
                                              caps: capabilities (protocol.lifecycle, e.g. hosts_session_methods)
  hb     {state, meta?}                       heartbeat; also sent at once on a state change; meta only when it
                                              changed
  res    {rid, json, bind?}                   response to a call; `json` is the client's JSON-RPC text,
                                              `bind` = {sid, key} when the worker took a session
  ev     {seq, type, json}                    session event; `json` is the client's event text
  evs    {items: [[seq, type, json], ...]}    consecutive session events coalesced into one frame (the link
                                              packs what queued up while it was sending); the client still
                                              gets one message per event, in order
  bye    {reason}                             the worker is about to exit on its own
  held   {}                                   answer to `hold`: every frame before this one has been sent
Broker -> worker
  call   {rid, id, method, params}            a client call (id: the client's JSON-RPC id)
  stop   {reason}                             finalize (flush history) and exit; the worker's finalize budget is
                                              derived from config["stop_timeout"] (see worker/budget.py)
  ended  {key, reason, at?}                   to the lobby: a session's worker died without finalizing
                                              (killed, crashed); record `reason` on the stored row
  hold   {}                                   a restart is handing the link over: answer `held`, then send
                                              nothing (heartbeats included) until `release`; queue it all
  release {}                                  the successor broker has the link: send what was queued, in order

Every frame carries `v` (the version) and `k` (the kind). The broker forwards the
`json` bytes to clients without decoding them.
"""

from __future__ import annotations

from typing import Any

import msgpack

VERSION = 1
MAX_FRAME = 64 * 1024 * 1024  # bytes; the ROUTER drops peers that send more (ZMQ_MAXMSGSIZE)

HELLO, HB, RES, EV, BYE, CALL, STOP, ENDED = "hello", "hb", "res", "ev", "bye", "call", "stop", "ended"
EVS = "evs"
HOLD, HELD, RELEASE = "hold", "held", "release"  # a restart's handover of the link (supervisor/restart/)

# Required fields and their types, per kind.
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    HELLO: {"pid": int, "kind": str},
    HB: {"state": str},
    RES: {"rid": int, "json": (bytes, str)},
    EV: {"seq": int, "type": str, "json": (bytes, str)},
    EVS: {"items": list},
    BYE: {"reason": str},
    CALL: {"rid": int, "method": str, "params": dict},
    STOP: {"reason": str},
    ENDED: {"key": str, "reason": str},
    HOLD: {},
    HELD: {},
    RELEASE: {},
}

_packer = msgpack.Packer(use_bin_type=True)


class FrameError(ValueError):
    """A frame that cannot be trusted: logged and dropped by the receiver."""


def pack(kind: str, /, **fields: Any) -> bytes:
    fields["v"] = VERSION
    fields["k"] = kind
    return msgpack.packb(fields, use_bin_type=True)


def unpack(data: bytes) -> dict:
    """Decode and check one frame; raises FrameError for anything malformed."""
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=100_000,
            max_map_len=100_000,
        )
    except Exception as exc:  # msgpack raises many types for garbage
        raise FrameError(f"undecodable frame: {type(exc).__name__}: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise FrameError("frame is not a map")
    version = obj.get("v")
    if type(version) is not int or version != VERSION:  # not True, not 1.0
        raise FrameError(f"unsupported frame version {version!r}")
    kind = obj.get("k")
    schema = _SCHEMA.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise FrameError(f"unknown frame kind {kind!r}")
    for name, typ in schema.items():
        value = obj.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise FrameError(f"{kind} frame: field {name!r} missing or of the wrong type")
    if kind == EVS:
        _check_items(obj["items"])
    return obj


def _check_items(items: list) -> None:
    if not items:
        raise FrameError("evs frame: no items")
    for item in items:
        if (type(item) is not list or len(item) != 3 or type(item[0]) is not int or type(item[1]) is not str
                or not isinstance(item[2], (bytes, str))):
            raise FrameError("evs frame: every item must be [seq, type, json]")


def pack_events(items: list[tuple[int, str, bytes]]) -> bytes:
    """One event as `ev`, several as one `evs` frame."""
    if len(items) == 1:
        seq, type_, text = items[0]
        return pack(EV, seq=seq, type=type_, json=text)
    return pack(EVS, items=items)
