"""Issue 2 acceptance: a real gateway, real workers, real sockets."""

from __future__ import annotations

import asyncio
import os


from tests.client import Client
from tests.conftest import pid_alive, run, wait_for


def test_ready_first_and_three_sessions_in_their_own_groups(gateway):
    async def go():
        c = await Client.open(gateway.url)
        assert c.events[0]["type"] == "gateway.ready"
        assert c.ready.get("heartbeat") is True
        sids = [await c.create() for _ in range(3)]
        await c.close()
        return sids

    sids = run(go())
    assert len(set(sids)) == 3
    workers = wait_for(lambda: len(gateway.session_workers()) == 3 and gateway.session_workers(), 5,
                       what="3 session workers")
    for pid in workers:
        assert os.getpgid(pid) == pid, "each session worker leads its own process group"
    titles = " ".join(workers.values())
    for sid in sids:
        assert f"session={sid}" in titles


def test_concurrent_prompts_stream_their_own_words_in_order(gateway):
    texts = ["alpha beta gamma delta", "one two three four five six", "red green blue"]

    async def go():
        c = await Client.open(gateway.url)
        sids = [await c.create() for _ in texts]
        done = await asyncio.gather(*(c.turn(sid, text) for sid, text in zip(sids, texts)))
        for sid, text, complete in zip(sids, texts, done):
            assert complete["payload"]["text"] == text
            assert complete["payload"]["status"] == "complete"
            assert c.deltas(sid) == text
            evs = c.by_session[sid]
            seqs = [e["seq"] for e in evs]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert all(e["session_id"] == sid for e in evs)
            assert [e["type"] for e in evs if e["type"].startswith("message.")][0] == "message.start"
        await c.close()

    run(go())


def test_close_kills_the_worker_and_unknown_close_is_false(gateway):
    async def go():
        c = await Client.open(gateway.url)
        sid = await c.create()
        pid = next(p for p, t in gateway.session_workers().items() if sid in t)
        assert await c.call("session.close", {"session_id": sid}) == {"closed": True}
        assert not pid_alive(pid)
        assert await c.call("session.close", {"session_id": "deadbeef"}) == {"closed": False}
        await c.close()

    run(go())


def test_workers_never_import_code_from_the_current_directory(gateway_factory, tmp_dirs, monkeypatch):
    """A worker/ or protocol/ folder where the operator happens to stand must not be loaded into workers."""
    poison = tmp_dirs / "cwd"
    for pkg in ("worker", "protocol"):
        (poison / pkg).mkdir(parents=True)
        (poison / pkg / "__init__.py").write_text("raise SystemExit('loaded from the cwd')\n")
    monkeypatch.chdir(poison)
    gw = gateway_factory()

    async def go():
        c = await Client.open(gw.url)
        sid = await c.create()
        done = await c.turn(sid, "still the real worker")
        assert done["payload"]["text"] == "still the real worker"
        await c.close()

    run(go())
