"""Issue 4 acceptance: reaping, crashing or restarting loses nothing a user typed or read (real gateway, real SQLite)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.client import Client, RpcFailed
from tests.conftest import kill_tree, pid_alive, run, start_gateway, wait_for

STORE_UNAVAILABLE = 5031
STORED_SESSION_NOT_FOUND = 4007


# -- helpers ------------------------------------------------------------------

def db_rows(data_dir: Path, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    """Read the gateway's store directly, as a separate reader (WAL lets it read while workers write)."""
    db = sqlite3.connect(f"file:{data_dir / 'sessions.db'}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def session_row(data_dir: Path, key: str) -> sqlite3.Row:
    rows = db_rows(data_dir, "SELECT * FROM sessions WHERE key = ?", (key,))
    assert rows, f"no stored row for {key}"
    return rows[0]


def stored_messages(data_dir: Path, key: str) -> list[tuple]:
    return [(r["role"], r["text"], r["status"]) for r in
            db_rows(data_dir, "SELECT role, text, status FROM messages WHERE session_key = ? ORDER BY id", (key,))]


def worker_pid(gw, sid: str) -> int:
    return wait_for(lambda: next((p for p, t in gw.session_workers().items() if f"session={sid}" in t), None), 10,
                    what=f"worker of {sid}")


async def create(c: Client) -> tuple[str, str]:
    """-> (runtime id, stored key)"""
    res = await c.call("session.create", {"cols": 80})
    return res["session_id"], res["info"]["stored_session_id"]


async def turns(c: Client, sid: str, texts: list[str]) -> list[dict]:
    """Run prompts one after another; return the transcript as the client saw it (display projection)."""
    seen = []
    for text in texts:
        start = len(c.by_session[sid])
        done = await c.turn(sid, text, timeout=30)
        streamed = "".join(e.get("payload", {}).get("text", "") for e in c.by_session[sid][start:]
                           if e["type"] == "message.delta")
        assert done["payload"]["status"] == "complete"
        assert done["payload"]["text"] == streamed == text  # echo agent
        seen += [{"role": "user", "text": text}, {"role": "assistant", "text": streamed}]
    return seen


async def history(c: Client, sid: str) -> list[dict]:
    res = await c.call("session.history", {"session_id": sid})
    assert res["count"] == len(res["messages"])
    return res["messages"]


# -- acceptance 1: reap, then resume by stored key -----------------------------

def test_reaped_session_resumes_in_a_new_worker_with_the_whole_history(gateway_factory):
    gw = gateway_factory("--reap-grace", "0.5")

    async def go():
        c = await Client.open(gw.url)
        sid, key = await create(c)
        pid = worker_pid(gw, sid)
        seen = await turns(c, sid, ["hello there", "a second prompt with more words", "third"])
        assert await history(c, sid) == seen
        c.abort()  # the tab is gone, no session.close
        await asyncio.to_thread(wait_for, lambda: not pid_alive(pid), 15, what="reap of the detached worker")
        row = session_row(gw.data_dir, key)
        assert row["end_reason"] == "ws_orphan_reap" and row["ended_at"] is not None

        c2 = await Client.open(gw.url)
        res = await c2.call("session.resume", {"session_id": key, "cols": 80})
        assert res["resumed"] == key and res["session_id"] != sid
        assert res["message_count"] == len(seen) == 6
        assert res["messages"] == seen
        new_pid = worker_pid(gw, res["session_id"])
        assert new_pid != pid
        assert await history(c2, res["session_id"]) == seen
        row = session_row(gw.data_dir, key)
        assert row["ended_at"] is None and row["end_reason"] is None  # re-opened
        # the resumed session goes on where it stopped, in the same stored row
        seen += await turns(c2, res["session_id"], ["after resume"])
        assert await history(c2, res["session_id"]) == seen
        assert stored_messages(gw.data_dir, key) == [
            (m["role"], m["text"], "complete" if m["role"] == "assistant" else None) for m in seen]
        await c2.close()

    run(go())


# -- acceptance 2: SIGKILL mid-turn -------------------------------------------

def test_worker_killed_mid_turn_keeps_the_prompt_and_the_partial_reply_as_interrupted(gateway_factory):
    gw = gateway_factory("--echo-delay", "0.1")
    long_text = " ".join(f"w{i}" for i in range(200))  # ~20 s of streaming

    async def go():
        c = await Client.open(gw.url)
        sid, key = await create(c)
        pid = worker_pid(gw, sid)
        before = await turns(c, sid, ["one two"])
        await c.call("prompt.submit", {"session_id": sid, "text": long_text})
        first = await c.wait_event(lambda e: e["session_id"] == sid and e["type"] == "message.delta"
                                   and e["payload"]["text"].strip() == "w0", 10)
        received: list[tuple[float, str]] = []  # (arrival, text) of every delta of this turn
        samples: list[tuple[float, str]] = []  # (when, the partial reply stored in the file then)
        start_index = c.by_session[sid].index(first)
        seen_events = start_index
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.5:  # > 1 s of streaming: several partial commits happened
            await asyncio.sleep(0.1)
            for e in c.by_session[sid][seen_events:]:
                if e["type"] == "message.delta":
                    received.append((time.monotonic(), e["payload"]["text"]))
            seen_events = len(c.by_session[sid])
            rows = stored_messages(gw.data_dir, key)
            samples.append((time.monotonic(), rows[3][1] if len(rows) > 3 else ""))
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        reclaimed = await c.wait_event(lambda e: e["session_id"] == sid and e["type"] == "session.reclaimed", 10)
        assert reclaimed["payload"]["reason"] == "worker_exit"
        assert reclaimed["payload"]["stored_session_id"] == key
        seen_text = "".join(e["payload"]["text"] for e in c.by_session[sid][start_index:]
                            if e["type"] == "message.delta")

        # what the dead worker left in the file, before anyone resumes it
        stored = stored_messages(gw.data_dir, key)
        assert stored[:3] == [("user", "one two", None), ("assistant", "one two", "complete"),
                              ("user", long_text, None)]
        assert len(stored) == 4 and stored[3][0] == "assistant" and stored[3][2] == "streaming"
        partial = stored[3][1]
        assert partial and seen_text.startswith(partial) and long_text.startswith(partial)
        # committed at least every second: at any moment, whatever reached the client 2 s earlier is stored
        for when, stored_then in samples + [(killed_at, partial)]:
            old = "".join(text for at, text in received if at < when - 2.0)
            assert stored_then.startswith(old), (round(when - t0, 2), len(old), len(stored_then))
        assert len(partial) >= len("".join(text for at, text in received if at < killed_at - 2.0)) > 0
        # the broker had the lobby record why the session ended (the worker could not)
        await asyncio.to_thread(wait_for, lambda: session_row(gw.data_dir, key)["end_reason"] == "worker_exit",
                                10, what="end reason worker_exit")

        res = await c.call("session.resume", {"session_id": key})
        expected = before + [{"role": "user", "text": long_text},
                             {"role": "assistant", "text": partial, "status": "interrupted"}]
        assert res["messages"] == expected and res["message_count"] == 4
        assert await history(c, res["session_id"]) == expected
        assert stored_messages(gw.data_dir, key)[3] == ("assistant", partial, "interrupted")
        await c.close()

    run(go())


# -- acceptance 3: SIGKILL the broker with 5 live sessions ---------------------

def test_broker_killed_with_five_live_sessions_all_resume_after_restart(tmp_dirs, gateway_factory):
    first = start_gateway(tmp_dirs)
    try:
        async def fill():
            c = await Client.open(first.url)
            out = {}
            for i in range(5):
                sid, key = await create(c)
                out[key] = (sid, await turns(c, sid, [f"session {i} first", f"session {i} second words"][: 1 + i % 2]))
            return out

        sessions = run(fill())
        pids = set(first.session_workers())
        assert len(pids) == 5
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(10)
        # the workers go with their broker (parent-death signal, parent watch): nothing to clean up
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10, what="workers to die with the broker")
    finally:
        kill_tree(first, graceful=False)

    second = gateway_factory()  # same data dir (and runtime dir)
    assert second.data_dir == first.data_dir

    async def resume_all():
        c = await Client.open(second.url)
        listed = {r["session_key"]: r for r in (await c.call("session.list", {"limit": 50}))["sessions"]}
        assert set(listed) == set(sessions)
        for key, (old_sid, seen) in sessions.items():
            assert listed[key]["message_count"] == len(seen)
            res = await c.call("session.resume", {"session_id": key})
            assert res["resumed"] == key and res["messages"] == seen
            assert await history(c, res["session_id"]) == seen
        assert len(second.session_workers()) == 5
        await c.close()

    run(resume_all())


# -- acceptance 4: 50 sessions streaming into one file -------------------------

SESSIONS = 50


@pytest.mark.timeout(120)
def test_fifty_sessions_stream_concurrently_without_lock_errors(gateway_factory):
    # 40 words at 30 ms: every turn streams > 1 s, so each also commits a partial reply mid-turn
    gw = gateway_factory("--max-workers", str(SESSIONS + 10), "--echo-delay", "0.03", "--warm-pool", "4")
    prompts = [[" ".join(f"s{n}t{t}w{i}" for i in range(40)) for t in range(2)] for n in range(SESSIONS)]

    async def go():
        clients = [await Client.open(gw.url) for _ in range(5)]
        owners, sids, keys = [], [], []
        for n in range(SESSIONS):
            c = clients[n % len(clients)]
            sid, key = await create(c)
            owners.append(c)
            sids.append(sid)
            keys.append(key)
        failures = []
        for t in range(2):  # two rounds, each with all 50 turns in flight at once
            results = await asyncio.gather(
                *(owners[n].turn(sids[n], prompts[n][t], timeout=90) for n in range(SESSIONS)),
                return_exceptions=True)
            failures += [r for r in results if isinstance(r, BaseException)]
            for n, r in enumerate(results):
                if not isinstance(r, BaseException):
                    assert r["payload"]["status"] == "complete" and r["payload"]["text"] == prompts[n][t]
        assert not failures, failures[:3]
        errors = [e for c in clients for e in c.events if e["type"] == "error"]
        assert not errors, errors[:3]
        for n in range(SESSIONS):
            expected = [m for text in prompts[n] for m in ({"role": "user", "text": text},
                                                           {"role": "assistant", "text": text})]
            assert await history(owners[n], sids[n]) == expected
        for c in clients:
            await c.close()
        return keys

    keys = run(go(), timeout=110)
    assert len(set(keys)) == SESSIONS
    for n, key in enumerate(keys):
        assert stored_messages(gw.data_dir, key) == [
            x for text in prompts[n] for x in (("user", text, None), ("assistant", text, "complete"))]
        assert session_row(gw.data_dir, key)["message_count"] == 4
    log = gw.log().lower()
    assert "locked" not in log and "could not store" not in log


def test_a_store_held_by_another_program_delays_a_prompt_and_kills_nobody(gateway_factory):
    """Another program holds sessions.db's write lock longer than the heartbeat timeout: the prompt's
    write-ahead waits (busy_timeout), the worker keeps beating, and the prompt is stored once the lock goes."""
    hb, liveness, hold = 0.25, 4, 3.0  # lost after 1 s of silence; the lock is held three times that
    gw = gateway_factory("--heartbeat-interval", str(hb), "--heartbeat-liveness", str(liveness))

    async def go():
        c = await Client.open(gw.url)
        sid, key = await create(c)
        await turns(c, sid, ["before the lock"])
        pid = worker_pid(gw, sid)
        holder = sqlite3.connect(str(gw.data_dir / "sessions.db"), timeout=10, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as a sqlite3 shell in a transaction would hold it
        t0 = time.monotonic()
        try:
            submit = asyncio.ensure_future(c.call("prompt.submit", {"session_id": sid, "text": "while locked"},
                                                  timeout=30))
            await asyncio.sleep(hold)
            assert not submit.done(), "the prompt was answered before its write-ahead could commit"
            assert pid_alive(pid), "the worker was killed while it waited for the store"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert await submit == {"status": "streaming"}
        waited = time.monotonic() - t0
        done = await c.wait_event(lambda e: e["type"] == "message.complete" and e["session_id"] == sid
                                  and e["payload"]["text"] == "while locked", 15)
        assert done["payload"]["status"] == "complete"
        reclaimed = [e for e in c.by_session[sid] if e["type"] == "session.reclaimed"]
        await c.close()
        return key, pid, waited, reclaimed

    key, pid, waited, reclaimed = run(go(), 60)
    assert waited >= hold and not reclaimed
    assert "heartbeat lost" not in gw.log()
    assert stored_messages(gw.data_dir, key)[-2:] == [("user", "while locked", None),
                                                      ("assistant", "while locked", "complete")]


# -- acceptance 5: a file that is not a database --------------------------------

def test_corrupt_database_gateway_serves_but_refuses_sessions(tmp_dirs, gateway_factory):
    db = tmp_dirs / "data" / "sessions.db"
    db.parent.mkdir(parents=True)
    garbage = b"this is not an SQLite file, it is a note somebody saved here\n" * 100
    db.write_bytes(garbage)
    gw = gateway_factory()

    async def go():
        c = await Client.open(gw.url)
        assert await c.call("gateway.ping") == {"ok": True}
        status = await c.call("setup.status")
        assert status["store"]["ok"] is False
        assert "file is not a database" in status["store"]["error"] and str(db) in status["store"]["error"]
        for method, params in (("session.create", {"cols": 80}), ("session.resume", {"session_id": "anything"})):
            with pytest.raises(RpcFailed) as err:
                await c.call(method, params)
            assert err.value.code == STORE_UNAVAILABLE
            assert "refusing to create sessions" in err.value.message and "file is not a database" in err.value.message
        with pytest.raises(RpcFailed) as err:
            await c.call("session.list")
        assert err.value.code == STORE_UNAVAILABLE
        assert await c.call("gateway.ping") == {"ok": True}
        await c.close()

    run(go())
    log = wait_for(lambda: "file is not a database" in gw.log() and gw.log(), 10, what="the store error in the log")
    assert "session store unusable" in log and str(db) in log
    assert not gw.session_workers()
    assert db.read_bytes() == garbage  # never overwritten: whatever it was is still there to rescue


# -- listing, titles, end reasons ----------------------------------------------

def test_list_most_recent_and_titles_resume_by_exact_title(gateway_factory):
    gw = gateway_factory()

    async def go():
        c = await Client.open(gw.url)
        made = []
        for i in range(3):
            sid, key = await create(c)
            await turns(c, sid, [f"question number {i}"])
            made.append((sid, key))
            await asyncio.sleep(0.02)
        rows = (await c.call("session.list", {"limit": 10}))["sessions"]
        assert [r["session_key"] for r in rows] == [k for _, k in reversed(made)]  # newest activity first
        for r, (sid, key), i in zip(rows, reversed(made), (2, 1, 0)):
            assert r["id"] == key and r["preview"] == f"question number {i}" and r["message_count"] == 2
            assert abs(r["started_at"] - time.time()) < 120 and r["title"] == ""
        assert [r["session_key"] for r in (await c.call("session.list", {"limit": 1}))["sessions"]] == [made[2][1]]
        recent = await c.call("session.most_recent")
        assert recent["session_id"] == made[2][1] and recent["source"] == "tui"

        # activity moves a session to the top
        await turns(c, made[0][0], ["back to the first"])
        assert (await c.call("session.most_recent"))["session_id"] == made[0][1]
        assert (await c.call("session.list"))["sessions"][0]["message_count"] == 4

        # titles: set, read, event, clash suffix
        sid0, key0 = made[0]
        res = await c.call("session.title", {"session_id": sid0, "title": "Parser plan"})
        assert res == {"title": "Parser plan", "session_key": key0}
        assert (await c.call("session.title", {"session_id": sid0}))["title"] == "Parser plan"
        ev = await c.wait_event(lambda e: e["type"] == "session.title" and e["session_id"] == sid0)
        assert ev["payload"] == {"session_id": key0, "title": "Parser plan"}
        dup = await c.call("session.title", {"session_id": made[1][0], "title": "Parser plan"})
        assert dup["title"] == "Parser plan #2"
        rows = {r["session_key"]: r for r in (await c.call("session.list"))["sessions"]}
        assert rows[key0]["title"] == "Parser plan" and rows[made[1][1]]["title"] == "Parser plan #2"

        # close, then resume by the exact title
        assert await c.call("session.close", {"session_id": sid0}) == {"closed": True}
        res = await c.call("session.resume", {"session_id": "Parser plan"})
        assert res["resumed"] == key0 and res["message_count"] == 4
        assert [m["text"] for m in res["messages"]] == ["question number 0"] * 2 + ["back to the first"] * 2
        assert res["info"]["title"] == "Parser plan"
        with pytest.raises(RpcFailed) as err:
            await c.call("session.resume", {"session_id": "parser plan"})  # not exact
        assert err.value.code == STORED_SESSION_NOT_FOUND
        await c.close()

    run(go())


def test_most_recent_on_an_empty_store(gateway):
    async def go():
        c = await Client.open(gateway.url)
        assert (await c.call("session.most_recent"))["session_id"] is None
        assert (await c.call("session.list"))["sessions"] == []
        await c.close()

    run(go())


def test_end_reasons_close_evicted_and_shutdown(tmp_dirs):
    gw = start_gateway(tmp_dirs, "--max-workers", "2")
    try:
        async def go():
            a = await Client.open(gw.url)
            s1, k1 = await create(a)
            s2, k2 = await create(a)
            await turns(a, s1, ["closing this one"])
            await turns(a, s2, ["this one gets evicted"])
            assert await a.call("session.close", {"session_id": s1}) == {"closed": True}
            await a.close()  # s2 is now detached and idle
            b = await Client.open(gw.url)
            s3, k3 = await create(b)
            s4, k4 = await create(b)  # full: s2 is evicted to make room
            await turns(b, s3, ["alive until shutdown"])
            return k1, k2, k3, k4

        k1, k2, k3, k4 = run(go())
        assert session_row(gw.data_dir, k1)["end_reason"] == "client_close"
        assert session_row(gw.data_dir, k2)["end_reason"] == "evicted"
        assert session_row(gw.data_dir, k3)["ended_at"] is None
    finally:
        kill_tree(gw)  # SIGTERM: a clean drain
    assert gw.proc.returncode == 0
    for key in (k3, k4):
        assert session_row(gw.data_dir, key)["end_reason"] == "shutdown"
    assert stored_messages(gw.data_dir, k3) == [("user", "alive until shutdown", None),
                                                ("assistant", "alive until shutdown", "complete")]


def test_end_reasons_of_hard_kills_and_stale_turns(gateway_factory):
    gw = gateway_factory("--heartbeat-interval", "0.25", "--heartbeat-liveness", "4", "--busy-stale", "1",
                         "--echo-delay", "3")

    async def go():
        c = await Client.open(gw.url)
        hung_sid, hung_key = await create(c)
        hung_pid = worker_pid(gw, hung_sid)
        os.kill(hung_pid, signal.SIGSTOP)  # hung: alive, silent
        reclaimed = await c.wait_event(lambda e: e["session_id"] == hung_sid and e["type"] == "session.reclaimed", 15)
        assert reclaimed["payload"]["reason"] == "heartbeat_lost"
        await asyncio.to_thread(wait_for, lambda: not pid_alive(hung_pid), 10, what="hung worker killed")
        await asyncio.to_thread(
            wait_for, lambda: session_row(gw.data_dir, hung_key)["end_reason"] == "heartbeat_lost", 10,
            what="end reason heartbeat_lost")

        # a detached turn that stops making progress is given up after busy_stale
        d = await Client.open(gw.url)
        sid, key = await create(d)
        pid = worker_pid(gw, sid)
        await d.call("prompt.submit", {"session_id": sid, "text": "slow words here"})
        await d.wait_event(lambda e: e["session_id"] == sid and e["type"] == "message.delta")
        d.abort()
        await asyncio.to_thread(wait_for, lambda: not pid_alive(pid), 15, what="stale turn reaped")
        row = session_row(gw.data_dir, key)
        assert row["end_reason"] == "busy_stale"
        assert stored_messages(gw.data_dir, key) == [("user", "slow words here", None),
                                                     ("assistant", "slow ", "interrupted")]
        await c.close()

    run(go())
