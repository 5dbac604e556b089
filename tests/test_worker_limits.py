"""Issue 14, the worker's share of bounded work: background turns go through a small pool with a bounded
queue (item 4), and a streaming reply is kept in pieces, so its cost stays linear in its length (item 14;
bench/reply_cost.py measures the worker's CPU)."""

from __future__ import annotations

import time

from protocol.jsonrpc import LIMIT_REACHED
from tests.client import Client, RpcFailed
from tests.conftest import run
from worker.agents.base import AgentEvent, TurnResult
from worker.channel import Channel
from worker.session import SessionRuntime


def test_background_turns_beyond_the_pool_and_queue_get_4290_naming_the_limit(gateway_factory):
    # one word per 0.3 s, 4 words: a background turn takes ~1 s, so the pool (1) and queue (2) are full at once
    gw = gateway_factory("--echo-delay", "0.3", "--background-workers", "1", "--background-queue", "2")

    async def go():
        c = await Client.open(gw.url)
        sid = await c.create()
        text = "one two three four"
        tasks = [(await c.call("prompt.background", {"session_id": sid, "text": text}))["task_id"] for _ in range(3)]
        try:
            await c.call("prompt.background", {"session_id": sid, "text": text})
            raise AssertionError("a 4th background turn was accepted past 1 running + 2 queued")
        except RpcFailed as err:
            assert err.code == LIMIT_REACHED
            assert "background limit reached" in err.message and "--background-queue" in err.message
        # the connection and the session stay usable, and every accepted task completes
        assert await c.call("gateway.ping") == {"ok": True}
        done = set()
        while done != set(tasks):
            ev = await c.wait_event(lambda e: e["type"] == "background.complete"
                                    and e["payload"]["task_id"] not in done, timeout=15)
            assert ev["payload"]["status"] == "complete" and ev["payload"]["text"] == text
            done.add(ev["payload"]["task_id"])
        # the slots are free again
        assert (await c.call("prompt.background", {"session_id": sid, "text": "again"}))["task_id"]
        await c.close()

    run(go(), 40)


class _CountingAgent:
    """Streams `n` pieces and checks, at each one, how the runtime holds the reply so far."""

    name = model = "counting"

    def __init__(self, runtime: SessionRuntime, n: int) -> None:
        self.runtime, self.n = runtime, n
        self.seen: list[int] = []

    def run_turn(self, text, history, cancel):
        for i in range(self.n):
            held = self.runtime._reply  # the pieces so far: a list that grows by one per delta
            self.seen.append(len(held) if isinstance(held, list) else -1)
            yield AgentEvent("message.delta", {"text": f"w{i} "})
        return TurnResult(status="complete")


def test_a_streaming_reply_is_held_as_pieces_and_joined_only_when_read(worker_link):
    link, _router = worker_link
    rt = SessionRuntime(Channel(link), {"agent": "echo"}, None, "persistence disabled")
    n = 50_000
    rt.agent = agent = _CountingAgent(rt, n)
    rt.sid, rt.key = "s", "k"
    rt.set_state("working")
    snapshot_mid: list[str] = []

    orig_emit = rt.ch.emit

    def emit(type_, payload=None):
        orig_emit(type_, payload)
        if type_ == "message.delta" and len(snapshot_mid) == 0 and payload["text"] == "w999 ":
            snapshot_mid.append(rt.snapshot()["inflight"]["assistant"])

    rt.ch.emit = emit
    try:
        rt._turn("go")
    finally:
        rt.finalize("stopped")
    # the n-th delta found n pieces held, never a string rebuilt per delta (the old `partial +=`)
    assert agent.seen == list(range(n))
    assert snapshot_mid == ["".join(f"w{i} " for i in range(1000))]
    assert rt.partial == "" and rt.transcript[-1]["text"] == "".join(f"w{i} " for i in range(n))


def test_the_pool_refuses_past_its_bound_and_frees_a_slot_when_a_job_ends():
    import threading

    from protocol.jsonrpc import RpcError
    from worker.background import BackgroundPool

    pool = BackgroundPool(workers=1, depth=1)
    release, ran = threading.Event(), []
    pool.submit(lambda: (release.wait(10), ran.append(1)))
    pool.submit(lambda: ran.append(2))
    try:
        pool.submit(lambda: ran.append(3))
        raise AssertionError("a third job was accepted past 1 running + 1 queued")
    except RpcError as exc:
        assert exc.code == LIMIT_REACHED and exc.data["limit"] == "background_queue"
    release.set()
    for _ in range(200):
        if ran == [1, 2]:
            break
        time.sleep(0.01)
    assert ran == [1, 2]
    pool.submit(lambda: ran.append(4))
    pool.stop()
