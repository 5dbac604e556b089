"""Hypothesis strategies for hostile input: JSON-RPC frames for the WebSocket, forged frames for the broker.

WebSocket frames (`ws_frames`) are tagged with how they travel:
  text      a text frame (JSON of every shape, valid or not, batches, deep nesting, garbage)
  binary    a binary frame (the gateway answers -32700 and keeps the connection)
  bad_utf8  a text frame whose bytes are not UTF-8 (the connection is closed with 1007)
  oversize  a text frame over --max-frame (the connection is closed with 1009)
Broker frames (`forged_frames`) are raw bytes for one ZeroMQ message part: garbage, truncated
valid frames, wrong field types, unknown kinds, lying length headers, ext types, non-maps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import msgpack
from hypothesis import strategies as st

from protocol import frames
from protocol.methods import DUAL_METHODS, GATEWAY_METHODS, SESSION_METHODS

GLOBAL_METHODS = {"commands.catalog", "setup.status", "session.list", "session.most_recent", "model.options",
                  "command.resolve", "pet.cells"}
# session.create would start a worker per example: it gets its own, rarer branch
KNOWN_METHODS = sorted((GATEWAY_METHODS | SESSION_METHODS | DUAL_METHODS | GLOBAL_METHODS) - {"session.create"})


@dataclass(frozen=True)
class WsFrame:
    kind: str  # text | binary | bad_utf8 | oversize
    data: str | bytes

    def __repr__(self) -> str:  # keep hypothesis' failure reports readable
        shown = self.data if len(self.data) < 300 else self.data[:300]
        return f"WsFrame({self.kind}, {shown!r}{'...' if len(self.data) >= 300 else ''} [{len(self.data)}])"


# lone surrogates: json.dumps writes them as "\\ud800" escapes, which decode to strings that are not Unicode
surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
texts = st.text(max_size=30) | surrogates
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | texts)
values = st.recursive(scalars, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=10), ch,
                                                                                       max_size=4), max_leaves=12)
good_ids = st.integers(-(2**53), 2**53) | st.text(max_size=40)
some_ids = good_ids | surrogates
ids = st.one_of(
    good_ids,
    st.integers(2**63, 2**128), st.integers(-(2**128), -(2**63) - 1),  # huge
    st.text(min_size=250, max_size=300),  # long
    st.floats(allow_nan=False),  # includes ±Infinity (json.dumps writes it, Python reads it)
    st.booleans(), st.none(), st.lists(scalars, max_size=2), st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)
methods = st.sampled_from(KNOWN_METHODS) | st.text(max_size=40) | surrogates
param_dicts = st.one_of(
    st.fixed_dictionaries({}, optional={
        "session_id": st.text(max_size=12) | values, "text": st.text(max_size=60) | values | surrogates,
        "cols": st.integers(-5, 20_000) | values, "key": st.sampled_from(["full", "mtime", "model"]) | values,
        "value": values, "limit": st.integers(-5, 10_000) | values, "command": st.text(max_size=20),
        "current_session_id": st.text(max_size=12), "last_seen": st.integers(-5, 10**6) | values,
        "title": st.text(max_size=20) | values,
    }),
    st.dictionaries(st.text(max_size=8), values, max_size=5),
)
params = param_dicts | values

valid_requests = st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "method": st.sampled_from(KNOWN_METHODS)},
                                       optional={"id": some_ids, "params": param_dicts})
wild_requests = st.fixed_dictionaries({}, optional={
    "jsonrpc": st.just("2.0") | st.sampled_from(["1.0", "2", "", None]) | values,
    "id": ids, "method": methods | values, "params": params | st.none(),
})
creates = st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "method": st.just("session.create")},
                                optional={"id": good_ids, "params": param_dicts | values})
request_objects = valid_requests | wild_requests | values
batches = st.lists(valid_requests | wild_requests | scalars, max_size=12)


def _text(obj) -> str:
    return json.dumps(obj)  # ensure_ascii: lone surrogates travel as \\ud800 escapes, as any JSON encoder may


def _nest(depth: int, opener: str, closer: str, inner: str = "1") -> str:
    return opener * depth + inner + closer * depth


deep = st.one_of(
    st.integers(1, 200_000).map(lambda n: _nest(n, "[", "]", "")),
    st.integers(1, 3_000).map(lambda n: '{"jsonrpc":"2.0","id":1,"method":"session.list","params":{"limit":'
                              + _nest(n, '{"a":', "}") + "}}"),
    st.integers(1, 3_000).map(lambda n: '{"jsonrpc":"2.0","id":"deep","method":"gateway.ping","params":{"x":'
                              + _nest(n, "[", "]") + "}}"),
)


def bad_utf8_bytes() -> st.SearchStrategy[bytes]:
    invalid = st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82"])
    return st.tuples(st.binary(max_size=20), invalid, st.binary(max_size=20)).map(lambda t: t[0] + t[1] + t[2]).filter(
        _not_utf8)


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def ws_frames(max_frame: int) -> st.SearchStrategy[WsFrame]:
    text = st.one_of(
        request_objects.map(_text), request_objects.map(_text), batches.map(_text), creates.map(_text),
        deep, st.text(max_size=200), st.sampled_from(["", " ", "null", "[]", "{}", "[[]]", "[{}]", "NaN", "1e999"]),
    ).map(lambda s: WsFrame("text", s))
    binary = (st.binary(max_size=200) | request_objects.map(lambda o: _text(o).encode())).map(
        lambda b: WsFrame("binary", b))
    closing = st.one_of(
        bad_utf8_bytes().map(lambda b: WsFrame("bad_utf8", b)),
        st.integers(max_frame + 1, max_frame + 4096).map(lambda n: WsFrame("oversize", "x" * n)),
    )
    return st.one_of(text, text, text, text, binary, closing)


# -- broker frames ---------------------------------------------------------------
KINDS = [frames.HELLO, frames.HB, frames.RES, frames.EV, frames.BYE, frames.CALL, frames.STOP]
frame_fields = st.dictionaries(st.sampled_from(["pid", "kind", "state", "seq", "rid", "json", "type", "reason",
                                                "method", "params", "bind", "meta", "id"]),
                               values | st.binary(max_size=40), max_size=6)


def _pack(obj) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        return b"\xc1"  # never-used msgpack byte


plausible = st.tuples(st.sampled_from(KINDS), frame_fields, st.sampled_from([1, 1, 1, 0, 2, True, 1.0, "1"])).map(
    lambda t: {**t[1], "k": t[0], "v": t[2]})
lying_headers = st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                                 b"\xc6\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x05", b"\x81", b"\x91", b"\xdc\x00"])
forged_frames = st.one_of(
    st.binary(max_size=300),
    plausible.map(_pack),
    st.tuples(plausible.map(_pack), st.integers(0, 60)).map(lambda t: t[0][:t[1]]),  # truncated
    st.tuples(lying_headers, st.binary(max_size=30)).map(lambda t: t[0] + t[1]),
    values.map(_pack),  # not a map
    st.binary(max_size=20).map(lambda b: _pack({"v": 1, "k": "hb", "state": msgpack.ExtType(7, b), "seq": 1})),
    st.integers(1, 2_000).map(lambda n: b"\x91" * n + b"\xc0"),  # deep arrays
)
