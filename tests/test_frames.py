"""protocol/frames.py: every frame kind round-trips, and anything malformed raises FrameError (never another error)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import frames
from protocol.frames import FrameError

# One valid example of every kind, with the fields the schema requires (plus the optional ones in use).
EXAMPLES: dict[str, dict] = {
    frames.HELLO: {"pid": 4242, "kind": "spare", "meta": {"store_error": ""}, "caps": ["hosts_session_methods"]},
    frames.HB: {"state": "idle", "meta": {"title": "t", "message_count": 3}},
    frames.RES: {"rid": 12, "json": b'{"jsonrpc":"2.0","id":1,"result":{}}', "bind": {"sid": "abcd1234", "key": "k"}},
    frames.EV: {"seq": 3, "type": "message.delta", "json": '{"jsonrpc":"2.0","method":"event"}'},
    frames.EVS: {"items": [[4, "message.delta", b'{"a":1}'], [5, "message.complete", '{"b":2}']]},
    frames.BYE: {"reason": "stopped"},
    frames.CALL: {"rid": 9, "id": "client-id", "method": "prompt.submit", "params": {"session_id": "x", "text": "hi"}},
    frames.STOP: {"reason": "client_close"},
    frames.ENDED: {"key": "20250101_120000_abcdef", "reason": "worker_exit", "at": 1735732800.5},
    frames.HOLD: {},
    frames.HELD: {},
    frames.RELEASE: {},
}


def test_every_kind_has_an_example():
    assert set(EXAMPLES) == set(frames._SCHEMA)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_round_trip(kind):
    data = frames.pack(kind, **EXAMPLES[kind])
    assert isinstance(data, bytes)
    got = frames.unpack(data)
    assert got["v"] == frames.VERSION and got["k"] == kind
    for name, value in EXAMPLES[kind].items():
        assert got[name] == value
    assert set(got) == set(EXAMPLES[kind]) | {"v", "k"}


def test_call_id_keeps_its_json_type():
    for cid in (1, "abc", 2.5, None, -7):
        got = frames.unpack(frames.pack(frames.CALL, rid=1, id=cid, method="m", params={}))
        assert got["id"] == cid and type(got["id"]) is type(cid)


def test_bytes_stay_bytes_and_text_stays_text():
    got = frames.unpack(frames.pack(frames.EV, seq=1, type="x", json=b"\x00\xffraw"))
    assert got["json"] == b"\x00\xffraw"
    got = frames.unpack(frames.pack(frames.EV, seq=1, type="x", json="é text"))
    assert got["json"] == "é text"


def _raw(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _valid(kind: str) -> dict:
    return dict(EXAMPLES[kind], v=frames.VERSION, k=kind)


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",  # the one byte msgpack never uses
    b"\x92\x01",  # truncated array
    b"garbage that is not msgpack at all \xff\xfe",
    _raw({"v": 1, "k": "hb", "state": "idle", "seq": 1}) + b"\x00",  # trailing bytes
], ids=["empty", "reserved-byte", "truncated", "garbage", "trailing"])
def test_undecodable_bytes(data):
    with pytest.raises(FrameError):
        frames.unpack(data)


@pytest.mark.parametrize("obj", [[1, 2, 3], "a string", 42, None, True, b"bytes"],
                         ids=["array", "str", "int", "nil", "bool", "bin"])
def test_not_a_map(obj):
    with pytest.raises(FrameError, match="not a map"):
        frames.unpack(_raw(obj))


@pytest.mark.parametrize("version", [None, 0, 2, "1", 1.5, 1.0, True], ids=repr)
def test_wrong_or_missing_version(version):
    frame = _valid(frames.HB)
    if version is None:
        del frame["v"]
    else:
        frame["v"] = version
    with pytest.raises(FrameError, match="version"):
        frames.unpack(_raw(frame))


@pytest.mark.parametrize("kind", [None, "nope", "", 1, b"hb", ["hb"]], ids=repr)
def test_unknown_or_mistyped_kind(kind):
    frame = _valid(frames.HB)
    if kind is None:
        del frame["k"]
    else:
        frame["k"] = kind
    with pytest.raises(FrameError, match="kind"):
        frames.unpack(_raw(frame))


def _field_cases() -> list[tuple[str, str]]:
    return [(kind, name) for kind, schema in sorted(frames._SCHEMA.items()) for name in schema]


@pytest.mark.parametrize("kind,name", _field_cases())
def test_missing_required_field(kind, name):
    frame = _valid(kind)
    del frame[name]
    with pytest.raises(FrameError, match=repr(name)):
        frames.unpack(_raw(frame))


_WRONG = {int: ["7", 1.5, None, [], True], str: [7, None, b"bytes", {}], dict: [[], "x", 1, None],
          (bytes, str): [7, None, [], {}], list: [{}, "x", 1, None]}


@pytest.mark.parametrize("kind,name", _field_cases())
def test_mistyped_required_field(kind, name):
    typ = frames._SCHEMA[kind][name]
    for wrong in _WRONG[typ]:
        frame = _valid(kind)
        frame[name] = wrong
        with pytest.raises(FrameError, match=repr(name)):
            frames.unpack(_raw(frame))


def test_non_string_map_keys_are_rejected():
    data = _raw({1: "x", "v": 1, "k": "bye", "reason": "r"})
    with pytest.raises(FrameError):
        frames.unpack(data)


def test_oversized_frame_is_rejected_before_decoding():
    data = _raw(dict(_valid(frames.EV), json=b"x" * frames.MAX_FRAME))
    assert len(data) > frames.MAX_FRAME
    with pytest.raises(FrameError, match="exceeds"):
        frames.unpack(data)


def test_container_limits_are_enforced():
    data = _raw(dict(_valid(frames.CALL), params={"list": list(range(100_001))}))
    assert len(data) < frames.MAX_FRAME
    with pytest.raises(FrameError):
        frames.unpack(data)


def _check_any(data: bytes) -> None:
    """Garbage either raises FrameError or, if by chance it is a valid frame, passes the schema."""
    try:
        got = frames.unpack(data)
    except FrameError:
        return
    assert isinstance(got, dict) and got["v"] == frames.VERSION and got["k"] in frames._SCHEMA


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_garbage_bytes_raise_only_frame_error(data):
    _check_any(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(EXAMPLES)), st.binary(min_size=1, max_size=64), st.integers(min_value=0))
def test_corrupted_valid_frames_raise_only_frame_error(kind, noise, at):
    data = bytearray(frames.pack(kind, **EXAMPLES[kind]))
    pos = at % len(data)
    data[pos:pos + len(noise)] = noise
    _check_any(bytes(data))


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=20),
                       st.binary(max_size=20))
_values = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "k", "pid", "kind", "state", "seq", "rid", "json", "type", "reason",
                                        "method", "params", "id"]), _values, max_size=8))
def test_random_maps_raise_only_frame_error(obj):
    _check_any(_raw(obj))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(EXAMPLES)), st.dictionaries(st.text(min_size=1, max_size=8), _values, max_size=4))
def test_extra_fields_survive_a_round_trip(kind, extra):
    extra = {k: v for k, v in extra.items() if k not in ("v", "k")}
    fields = dict(extra, **EXAMPLES[kind])
    got = frames.unpack(frames.pack(kind, **fields))
    for name, value in fields.items():
        assert got[name] == value


# -- coalesced events ---------------------------------------------------------------
def test_pack_events_one_is_ev_and_many_are_evs():
    one = frames.unpack(frames.pack_events([(1, "message.delta", b"{}")]))
    assert one["k"] == frames.EV and (one["seq"], one["type"], one["json"]) == (1, "message.delta", b"{}")
    items = [(i, "message.delta", b'{"n":%d}' % i) for i in range(1, 300)]
    many = frames.unpack(frames.pack_events(items))
    assert many["k"] == frames.EVS
    assert [tuple(x) for x in many["items"]] == items


@pytest.mark.parametrize("items", [
    [],
    [[1, "t"]],
    [[1, "t", b"j", "extra"]],
    [["1", "t", b"j"]],
    [[True, "t", b"j"]],
    [[1, b"t", b"j"]],
    [[1, "t", 5]],
    [{"seq": 1, "type": "t", "json": b"j"}],
    [[1, "t", b"j"], "not an item"],
], ids=["empty", "short", "long", "str-seq", "bool-seq", "bytes-type", "int-json", "map-item", "one-bad"])
def test_malformed_evs_items(items):
    with pytest.raises(FrameError, match="evs"):
        frames.unpack(_raw({"v": 1, "k": "evs", "items": items}))
