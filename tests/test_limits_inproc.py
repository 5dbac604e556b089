"""Issue 14 findings 4 (broker side), 6 and 15, in-process with real workers: every limit names itself in its
error, the connection stays usable, and nobody else's session pays for one client's flood."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tests.inproc import run, running_broker

pytestmark = pytest.mark.timeout(30)


def test_a_worker_takes_at_most_max_worker_queue_calls_and_the_connection_stays_usable() -> None:
    async def main() -> None:
        async with running_broker(max_worker_queue=5) as r:
            c = r.client()
            sid = (await r.call(c, "session.create"))["result"]["session_id"]
            pid = r.broker.sessions.find(sid).worker.pid
            os.kill(pid, signal.SIGSTOP)  # it answers nothing: its calls pile up in the broker
            try:
                waiting = [asyncio.ensure_future(r.call(c, "session.usage", session_id=sid)) for _ in range(5)]
                await asyncio.sleep(0.05)
                refused = await r.call(c, "session.usage", session_id=sid)
                assert refused["error"]["code"] == 4009
                assert "max_worker_queue=5" in refused["error"]["message"]
                assert len(r.broker.link.pending) == 5
            finally:
                os.kill(pid, signal.SIGCONT)
            answers = await asyncio.gather(*waiting)
            assert all("result" in a for a in answers)
            again = await r.call(c, "session.usage", session_id=sid)  # the same connection, served again
            assert "result" in again and not r.broker.link.waiting

    run(main())


def test_one_client_cannot_take_every_slot_or_evict_a_session_detached_by_a_refresh() -> None:
    async def main() -> None:
        async with running_broker(max_workers=6, reap_grace=30.0, list_grace=5.0) as r:
            other = r.client()
            kept = (await r.call(other, "session.create"))["result"]["session_id"]
            kept_pid = r.broker.sessions.find(kept).worker.pid
            r.broker.sessions.disconnect(other, time.monotonic())  # a browser refresh: back in a moment
            flood = r.client()
            answers = await asyncio.gather(*(r.call(flood, "session.create") for _ in range(20)))
            made = [a for a in answers if "result" in a]
            refused = [a["error"] for a in answers if "error" in a]
            assert len(made) == 4  # max(4, 6 // 4): with the refreshed one, 5 of the 6 slots
            assert all(e["code"] == 4090 and "max_client_sessions=4" in e["message"] for e in refused)
            back = r.client()
            res = await r.call(back, "session.resume", session_id=kept)
            assert res["result"]["session_id"] == kept
            assert r.broker.sessions.find(kept).worker.pid == kept_pid  # the same worker: never evicted
            assert r.broker.reaps["evicted"] == 0

    run(main())


def test_closing_a_session_tells_the_other_clients_watching_it() -> None:
    async def main() -> None:
        async with running_broker() as r:
            closer, watcher = r.client(), r.client()
            sid = (await r.call(closer, "session.create"))["result"]["session_id"]
            await r.call(watcher, "session.activate", session_id=sid)
            res = await r.call(closer, "session.close", session_id=sid)
            assert res["result"] == {"closed": True}
            told = watcher.events("session.reclaimed")
            assert [e["payload"]["reason"] for e in told] == ["client_close"]
            assert told[0]["payload"]["session_id"] == sid
            assert not closer.events("session.reclaimed")  # the closer has its answer

    run(main())
