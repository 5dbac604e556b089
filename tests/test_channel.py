"""What a worker puts on the link: nothing the broker's ROUTER would drop it for."""

from __future__ import annotations

import json

import pytest
import zmq

from protocol import frames
from worker import channel as channel_mod
from worker.channel import Call, Channel
from worker.link import Link


@pytest.fixture
def wire(worker_link):
    return worker_link


def _receive(link: Link, router: zmq.Socket) -> dict:
    link._flush()
    assert router.poll(5000), "nothing arrived"
    ident, data = router.recv_multipart()
    assert ident == b"w-test"
    return frames.unpack(data)


def test_a_response_over_the_link_budget_becomes_an_error_for_that_call(wire, monkeypatch):
    link, router = wire
    monkeypatch.setattr(channel_mod, "LINK_BUDGET", 4096)
    call = Call(Channel(link), rid=7, id="r1", method="session.history", params={})
    call.reply({"messages": [{"role": "user", "text": "x" * 10_000}]})
    frame = _receive(link, router)
    assert frame["k"] == frames.RES and frame["rid"] == 7
    body = json.loads(frame["json"])
    assert body["id"] == "r1" and body["error"]["code"] == -32603
    assert "exceeds the gateway's link limit" in body["error"]["message"]


def test_an_event_over_the_link_budget_is_replaced_by_an_error_event_with_its_seq(wire, monkeypatch):
    link, router = wire
    monkeypatch.setattr(channel_mod, "LINK_BUDGET", 4096)
    ch = Channel(link)
    ch.sid = "abcd1234"
    ch.emit("message.delta", {"text": "y" * 10_000})
    ch.emit("message.delta", {"text": "small"})
    frame = _receive(link, router)
    items = frame["items"] if frame["k"] == frames.EVS else [[frame["seq"], frame["type"], frame["json"]]]
    events = [json.loads(item[2])["params"] for item in items]
    assert [e["seq"] for e in events] == [1, 2]
    assert events[0]["type"] == "error" and "too large" in events[0]["payload"]["message"]
    assert events[1]["payload"] == {"text": "small"}


def test_responses_within_the_budget_pass_untouched(wire):
    link, router = wire
    call = Call(Channel(link), rid=1, id=5, method="session.history", params={})
    call.reply({"messages": [{"role": "user", "text": "z" * 100_000}]})
    body = json.loads(_receive(link, router)["json"])
    assert body["result"]["messages"][0]["text"] == "z" * 100_000
