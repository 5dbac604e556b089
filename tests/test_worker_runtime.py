"""The builtin runtime in a real worker: slash worker, notification poller, interrupt, busy rules, small calls."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.client import Client, RpcFailed
from tests.conftest import kill_tree, run, start_gateway

SLASH_TIMEOUT = 2.0
ECHO_DELAY = 0.2
INTERRUPT_TARGET = 0.100  # s, issue 2: "ends it with message.complete {status: interrupted} within 100 ms"
# the figure is bench/latency.py's `interrupt` (p50 ~2 ms from send); this test asserts the behaviour: the turn
# ends at once, not after the ~11 s of words still to come, with slack for a stall on a loaded 2-core machine
INTERRUPT_SLACK = 0.900  # s


def _module_gateway(*flags: str):
    tmp = Path(tempfile.mkdtemp(prefix="hg-", dir="/tmp"))
    g = start_gateway(tmp, *flags)
    return g, tmp


@pytest.fixture(scope="module")
def gw():
    g, tmp = _module_gateway("--slash-timeout", str(SLASH_TIMEOUT))
    yield g
    kill_tree(g)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def slow_gw():
    """Echo with a delay between words, so a turn lasts long enough to interrupt or collide with."""
    g, tmp = _module_gateway("--echo-delay", str(ECHO_DELAY))
    yield g
    kill_tree(g)
    shutil.rmtree(tmp, ignore_errors=True)


def session_test(gateway, body, timeout: float = 40):
    """Open a client and a session, run body(client, sid), close both."""

    async def go():
        c = await Client.open(gateway.url)
        sid = await c.create()
        try:
            return await body(c, sid)
        finally:
            try:
                await c.call("session.close", {"session_id": sid})
            finally:
                await c.close()

    return run(go(), timeout)


async def rpc_error(c: Client, method: str, params: dict) -> RpcFailed:
    with pytest.raises(RpcFailed) as info:
        await c.call(method, params)
    return info.value


# -- slash commands ---------------------------------------------------------------
def test_slash_help_lists_the_commands(gw):
    async def body(c: Client, sid: str):
        out = (await c.call("slash.exec", {"session_id": sid, "command": "/help"}))["output"]
        for cmd in ("/help", "/title", "/model", "/usage", "/clear", "/stop"):
            assert cmd in out

    session_test(gw, body)


def test_slash_title_sets_the_title_and_emits_session_title(gw):
    async def body(c: Client, sid: str):
        key = (await c.call("session.title", {"session_id": sid}))["session_key"]
        assert (await c.call("session.title", {"session_id": sid}))["title"] == ""
        out = (await c.call("slash.exec", {"session_id": sid, "command": "/title  Plans for Tuesday "}))["output"]
        assert "Plans for Tuesday" in out
        ev = await c.wait_event(lambda e: e["type"] == "session.title" and e["session_id"] == sid)
        assert ev["payload"] == {"session_id": key, "title": "Plans for Tuesday"}
        assert (await c.call("session.title", {"session_id": sid}))["title"] == "Plans for Tuesday"
        # /title without an argument only shows it
        assert "Plans for Tuesday" in (await c.call("slash.exec", {"session_id": sid, "command": "/title"}))["output"]
        # and the method sets it too
        res = await c.call("session.title", {"session_id": sid, "title": "Renamed"})
        assert res == {"title": "Renamed", "session_key": key}
        assert (await c.call("session.info", {"session_id": sid}))["title"] == "Renamed"
        err = await rpc_error(c, "session.title", {"session_id": sid, "title": "  "})
        assert err.code == 4002

    session_test(gw, body)


def test_slash_model_and_usage(gw):
    async def body(c: Client, sid: str):
        assert (await c.call("slash.exec", {"session_id": sid, "command": "/model"}))["output"] == "model: echo"
        out = (await c.call("slash.exec", {"session_id": sid, "command": "/model tiny-test-model"}))["output"]
        assert out == "model: tiny-test-model"
        assert (await c.call("session.info", {"session_id": sid}))["model"] == "tiny-test-model"
        await c.turn(sid, "count these four")
        out = (await c.call("slash.exec", {"session_id": sid, "command": "/usage"}))["output"]
        assert out.startswith("turns 1") and "input 3" in out and "output 3" in out
        usage = await c.call("session.usage", {"session_id": sid})
        assert usage == {"input": 3, "output": 3, "total": 6, "turns": 1}
        # command.dispatch runs the same table
        assert "model: tiny-test-model" == (await c.call("command.dispatch",
                                                         {"session_id": sid, "name": "model", "arg": ""}))["output"]

    session_test(gw, body)


def test_unknown_slash_command_is_5030(gw):
    async def body(c: Client, sid: str):
        err = await rpc_error(c, "slash.exec", {"session_id": sid, "command": "/frobnicate now"})
        assert err.code == 5030 and "frobnicate" in err.message
        err = await rpc_error(c, "slash.exec", {"session_id": sid, "command": "   "})
        assert err.code == 4002
        # the slash worker still serves
        assert "/help" in (await c.call("slash.exec", {"session_id": sid, "command": "/help"}))["output"]

    session_test(gw, body)


def test_slow_slash_never_blocks_prompts(gw):
    async def body(c: Client, sid: str):
        slash = asyncio.create_task(c.call("slash.exec", {"session_id": sid, "command": "/sleep 1"}, timeout=20))
        await asyncio.sleep(0.1)
        done = await c.turn(sid, "prompt while the slash worker sleeps")
        assert done["payload"]["text"] == "prompt while the slash worker sleeps"
        assert not slash.done(), "the prompt should finish while /sleep 1 still runs"
        assert (await slash)["output"] == "slept 1s"

    session_test(gw, body)


def test_overrunning_slash_is_answered_5030_and_the_queue_moves_on(gw):
    async def body(c: Client, sid: str):
        t0 = time.monotonic()
        stuck = asyncio.create_task(c.request("slash.exec", {"session_id": sid, "command": "/sleep 8"}, timeout=20))
        queued = asyncio.create_task(c.call("slash.exec", {"session_id": sid, "command": "/help"}, timeout=20))
        await asyncio.sleep(0.1)
        done = await c.turn(sid, "not blocked")
        assert done["payload"]["status"] == "complete" and not stuck.done()
        resp = await stuck
        took = time.monotonic() - t0
        assert resp["error"]["code"] == 5030 and "timed out" in resp["error"]["message"]
        assert SLASH_TIMEOUT - 0.1 <= took < 7, took  # answered by the deadline, not by the end of the sleep
        assert "/help" in (await queued)["output"]  # the command queued behind it ran on a fresh thread
        assert "model:" in (await c.call("slash.exec", {"session_id": sid, "command": "/model"}))["output"]

    session_test(gw, body)


# -- streaming: events coalesced on the worker link arrive one message each, complete and in order --
def test_long_streams_arrive_whole_and_in_order(gw):
    texts = [" ".join(f"s{k}w{i}" for i in range(3000)) for k in range(2)]

    async def go():
        c = await Client.open(gw.url)
        sids = [await c.create() for _ in texts]
        done = await asyncio.gather(*(c.turn(sid, text, timeout=60) for sid, text in zip(sids, texts)))
        for sid, text, end in zip(sids, texts, done):
            assert end["payload"]["text"] == text
            turn = [e for e in c.by_session[sid] if e["type"].startswith("message.")]
            assert turn[0]["type"] == "message.start" and turn[-1] is end
            assert len(turn) == 3000 + 2, "one client message per event"
            seqs = [e["seq"] for e in turn]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gap, no duplicate, in order"
            assert c.deltas(sid) == text
        for sid in sids:
            await c.call("session.close", {"session_id": sid})
        await c.close()

    run(go(), 90)


# -- background tasks: the notification poller --------------------------------------
def test_prompt_background_completes_through_the_poller(gw):
    async def body(c: Client, sid: str):
        res = await c.call("prompt.background", {"session_id": sid, "text": "summarise this quietly"})
        task_id = res["task_id"]
        assert isinstance(task_id, str) and task_id
        ev = await c.wait_event(lambda e: e["type"] == "background.complete" and e["session_id"] == sid)
        assert ev["payload"]["task_id"] == task_id
        assert ev["payload"]["text"] == "summarise this quietly"
        status = await c.wait_event(lambda e: e["type"] == "status.update" and e["session_id"] == sid)
        assert task_id in status["payload"]["text"]
        # a background task is not a turn: the transcript is untouched
        assert (await c.call("session.history", {"session_id": sid}))["count"] == 0
        err = await rpc_error(c, "prompt.background", {"session_id": sid, "text": ""})
        assert err.code == 4002

    session_test(gw, body)


# -- create/resume read cols leniently (as upstream's resume does), never a crash ----------------
def test_odd_cols_on_create_and_resume_fall_back_instead_of_crashing(gw):
    async def go():
        c = await Client.open(gw.url)
        for cols in ("abc", {"w": 1}, [80], -5, 0, 10**9, "120", 99.5, True):
            res = await c.call("session.create", {"cols": cols})
            sid = res["session_id"]
            key = res["stored_session_id"]
            assert await c.call("session.close", {"session_id": sid}) == {"closed": True}
            again = await c.call("session.resume", {"session_id": key, "cols": cols})
            assert again["session_id"] and again["resumed"] == key
            await c.call("session.close", {"session_id": again["session_id"]})
        await c.close()

    run(go(), 60)
    assert "Traceback" not in gw.log()


# -- history, usage, undo, resize -------------------------------------------------------
def test_history_usage_and_undo(gw):
    async def body(c: Client, sid: str):
        assert await c.call("session.history", {"session_id": sid}) == {"count": 0, "messages": []}
        assert await c.call("session.undo", {"session_id": sid}) == {"removed": 0}
        await c.turn(sid, "first question")
        await c.turn(sid, "second one here")
        hist = await c.call("session.history", {"session_id": sid})
        assert hist["count"] == 4
        assert hist["messages"] == [
            {"role": "user", "text": "first question"}, {"role": "assistant", "text": "first question"},
            {"role": "user", "text": "second one here"}, {"role": "assistant", "text": "second one here"}]
        usage = await c.call("session.usage", {"session_id": sid})
        assert usage["turns"] == 2 and usage["input"] == 5 and usage["output"] == 5
        assert await c.call("session.undo", {"session_id": sid}) == {"removed": 2}
        hist = await c.call("session.history", {"session_id": sid})
        assert hist["count"] == 2 and hist["messages"][-1]["text"] == "first question"
        active = await c.call("session.active_list", {"current_session_id": sid})
        row = next(r for r in active["sessions"] if r["id"] == sid)
        assert row["preview"] == "first question"

    session_test(gw, body)


@pytest.mark.parametrize("cols", [0, -1, 10_001, "80", 1.5, True, None, [80]], ids=repr)
def test_terminal_resize_rejects_bad_cols(gw, cols, request):
    async def body(c: Client, sid: str):
        err = await rpc_error(c, "terminal.resize", {"session_id": sid, "cols": cols})
        assert err.code == 4002 and "cols" in err.message

    session_test(gw, body)


def test_terminal_resize_accepts_good_cols(gw):
    async def body(c: Client, sid: str):
        for cols in (1, 120, 10_000):
            assert await c.call("terminal.resize", {"session_id": sid, "cols": cols}) == {"cols": cols}

    session_test(gw, body)


# -- turns: busy and interrupt ----------------------------------------------------------
def test_submit_while_busy_is_4009(slow_gw):
    async def body(c: Client, sid: str):
        text = " ".join(f"w{i}" for i in range(6))
        await c.call("prompt.submit", {"session_id": sid, "text": text})
        err = await rpc_error(c, "prompt.submit", {"session_id": sid, "text": "again"})
        assert err.code == 4009
        err = await rpc_error(c, "session.undo", {"session_id": sid})
        assert err.code == 4009
        done = await c.wait_event(lambda e: e["type"] == "message.complete" and e["session_id"] == sid, 20)
        assert done["payload"]["text"] == text and done["payload"]["status"] == "complete"
        # idle again: the next prompt is accepted
        assert (await c.turn(sid, "now", timeout=20))["payload"]["text"] == "now"
        hist = await c.call("session.history", {"session_id": sid})
        assert [m["text"] for m in hist["messages"] if m["role"] == "user"] == [text, "now"]

    session_test(slow_gw, body)


def test_interrupt_ends_the_turn_at_once(slow_gw):
    words = [f"word{i}" for i in range(60)]  # 12 s at 0.2 s a word

    async def body(c: Client, sid: str):
        await c.call("prompt.submit", {"session_id": sid, "text": " ".join(words)})
        await c.wait_event(lambda e: e["type"] == "message.delta" and e["session_id"] == sid
                           and e["payload"]["text"].strip() == "word2", 20)
        sent = time.monotonic()
        res = await c.call("session.interrupt", {"session_id": sid})
        answered = time.monotonic()
        assert res == {"status": "interrupted"}
        done = await c.wait_event(lambda e: e["type"] == "message.complete" and e["session_id"] == sid, 10)
        ended = time.monotonic()
        # measured where the client sees it: from the interrupt's response to message.complete
        lag = max(0.0, ended - answered)
        print(f"interrupt: message.complete {lag * 1000:.1f} ms after the interrupt response")
        assert done["payload"]["status"] == "interrupted"
        assert lag <= INTERRUPT_TARGET + INTERRUPT_SLACK, (
            f"message.complete came {lag * 1000:.0f} ms after the interrupt response "
            f"(target {INTERRUPT_TARGET * 1000:.0f} ms; round trip {1000 * (answered - sent):.0f} ms)")
        # the reply holds the words streamed so far, and nothing streams after the end
        partial = done["payload"]["text"]
        assert partial and " ".join(words).startswith(partial) and len(partial.split()) < len(words)
        assert c.deltas(sid) == partial
        n = len(c.by_session[sid])
        await asyncio.sleep(3 * ECHO_DELAY)
        assert not [e for e in c.by_session[sid][n:] if e["type"] == "message.delta"]
        hist = await c.call("session.history", {"session_id": sid})
        assert hist["messages"][-1] == {"role": "assistant", "text": partial, "status": "interrupted"}
        # idle again
        assert (await c.turn(sid, "after", timeout=20))["payload"]["status"] == "complete"
        return lag

    session_test(slow_gw, body)


def test_interrupt_when_idle_and_steer_rules(slow_gw):
    async def body(c: Client, sid: str):
        assert await c.call("session.interrupt", {"session_id": sid}) == {"status": "interrupted"}
        err = await rpc_error(c, "session.steer", {"session_id": sid, "text": "left"})
        assert err.code == 4009
        done = await c.turn(sid, "an interrupt before the turn does not leak into it", timeout=30)
        assert done["payload"]["status"] == "complete"

    session_test(slow_gw, body)


# -- --persist false: sessions live in memory only ----------------------------------------
def test_persistence_off_sessions_work_in_memory(gateway_factory):
    g = gateway_factory("--persist", "false")

    async def body(c: Client, sid: str):
        done = await c.turn(sid, "kept in memory")
        assert done["payload"]["text"] == "kept in memory"
        assert (await c.call("session.title", {"session_id": sid, "title": "volatile"}))["title"] == "volatile"
        assert "volatile" in (await c.call("slash.exec", {"session_id": sid, "command": "/title"}))["output"]
        hist = await c.call("session.history", {"session_id": sid})
        assert hist["count"] == 2 and hist["messages"][0]["text"] == "kept in memory"
        assert await c.call("session.undo", {"session_id": sid}) == {"removed": 2}
        # nothing stored: resuming by key finds nothing to load
        key = (await c.call("session.title", {"session_id": sid}))["session_key"]
        await c.call("session.close", {"session_id": sid})
        err = await rpc_error(c, "session.resume", {"session_id": key})
        assert err.code in (5031, 4007)
        err = await rpc_error(c, "session.list", {})
        assert err.code == 5031

    session_test(g, body)
    assert not (g.data_dir / "sessions.db").exists()
