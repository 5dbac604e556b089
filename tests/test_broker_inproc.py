"""Broker behaviour tested inside the test process (issue 11): the detach table, the stop ladder, the pool's
backoff and isolated hooks, each with real workers from a real zygote and each well under a second."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import psutil
import pytest

from supervisor.broker.pool import Backoff
from tests.inproc import run, running_broker

pytestmark = pytest.mark.timeout(30)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_close_on_disconnect_session_is_reaped_when_its_client_leaves() -> None:
    async def main() -> None:
        async with running_broker() as r:
            c = r.client()
            res = await r.call(c, "session.create", close_on_disconnect=True)
            s = r.broker.sessions.find(res["result"]["session_id"])
            assert s is not None and s.attached == {c.id}
            pid = s.worker.pid
            t0 = time.monotonic()
            r.broker.sessions.disconnect(c, time.monotonic())
            assert s.worker.stopping == "ws_orphan_reap"  # at once, not at the next tick
            await s.worker.ladder
            assert gone(pid) and time.monotonic() - t0 < 1.0
            assert r.broker.reaps["ws_orphan_reap"] == 1 and r.broker.sessions.find(s.sid) is None

    run(main())


def test_a_detached_session_keeps_its_worker_and_replays_what_was_missed_in_order() -> None:
    async def main() -> None:
        async with running_broker(reap_grace=30.0, echo_delay=0.01) as r:
            first = r.client()
            res = await r.call(first, "session.create")
            s = r.broker.sessions.find(res["result"]["session_id"])
            await r.call(first, "prompt.submit", session_id=s.sid, text="one two three four five six")
            r.broker.sessions.disconnect(first, time.monotonic())  # mid-turn: the reply streams on, unwatched
            assert s.detached_at is not None and not s.worker.stopping
            for _ in range(200):
                if any(b'"message.complete"' in data for _, data in s.replay):
                    break
                await asyncio.sleep(0.01)
            seen = len(first.got)
            second = r.client()
            res = await r.call(second, "session.activate", session_id=s.sid)
            assert res["result"]["session_id"] == s.sid and s.attached == {second.id}
            missed = second.events()
            seqs = [e["seq"] for e in missed]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # contiguous, in order, none twice
            assert missed[-1]["type"] == "message.complete" and second.events("message.delta")
            assert len(first.got) == seen and first.id not in s.attached  # nothing more to the one that left
            assert r.broker.sessions.watching(second) == {s.sid}

    run(main())


def test_every_routed_call_restarts_the_activity_clock() -> None:
    async def main() -> None:
        async with running_broker() as r:
            c = r.client()
            res = await r.call(c, "session.create")
            s = r.broker.sessions.find(res["result"]["session_id"])
            before = s.last_active
            await asyncio.sleep(0.05)
            await r.call(c, "session.usage", session_id=s.sid)
            assert s.last_active > before

    run(main())


def test_the_ladder_asks_first_and_a_frozen_worker_is_killed_by_its_group_within_stop_timeout() -> None:
    async def main() -> None:
        async with running_broker(stop_timeout=0.4) as r:
            c = r.client()
            a = r.broker.sessions.find((await r.call(c, "session.create"))["result"]["session_id"])
            b = r.broker.sessions.find((await r.call(c, "session.create"))["result"]["session_id"])
            t0 = time.monotonic()
            await r.broker.stop(a.worker, "client_close")
            asked = time.monotonic() - t0
            assert gone(a.worker.pid) and asked < 0.2  # it finalized when asked: no signal needed
            os.kill(b.worker.pid, signal.SIGSTOP)  # asked, it cannot answer: SIGTERM at 0.2 s, SIGKILL at 0.4 s
            t0 = time.monotonic()
            await r.broker.stop(b.worker, "operator_kill")
            took = time.monotonic() - t0
            assert gone(b.worker.pid) and 0.35 < took < 0.8, took
            assert r.broker.reaps["client_close"] == 1 and r.broker.reaps["operator_kill"] == 1

    run(main())


def test_a_raising_stop_hook_skips_neither_the_count_nor_the_log_line(caplog: pytest.LogCaptureFixture) -> None:
    def broken(reason: str, took: float) -> None:
        raise RuntimeError("a metrics bug")

    async def main() -> None:
        async with running_broker() as r:
            r.broker.ladder.on_stopped.append(broken)
            c = r.client()
            for _ in range(2):
                s = r.broker.sessions.find((await r.call(c, "session.create"))["result"]["session_id"])
                await r.broker.stop(s.worker, "client_close")  # would raise here if the hook's error escaped
            assert r.broker.reaps["client_close"] == 2
            assert r.broker.ladder.on_stopped.failures == 2

    with caplog.at_level(logging.INFO, logger="hermes.gateway"):
        run(main())
    stopped = [rec for rec in caplog.records if rec.getMessage() == "worker stopped"]
    failed = [rec for rec in caplog.records if rec.getMessage().startswith("hook failed")]
    assert len([rec for rec in stopped if rec.fields.get("reason") == "client_close"]) == 2
    assert len(failed) == 1  # logged once, then only counted


def test_backoff_doubles_while_young_and_resets_after_a_good_run() -> None:
    b = Backoff()
    assert [b.next(0.0, 1.0) for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert b.next(0.0, 60.0) == 0.0 and b.next(59.0, 60.0) == 1.0
    free = Backoff(free_first=True)
    assert [free.next(0.0, 1.0) for _ in range(4)] == [0.0, 1.0, 2.0, 4.0]


def test_a_fork_server_that_keeps_dying_is_restarted_once_at_once_then_after_a_backoff() -> None:
    """Killed while serving (its workers registered): restarted at once, however young. Dying again before
    any worker of it registered (a crash loop: a broken preload, say): the next start waits."""
    async def main() -> None:
        async with running_broker() as r:
            launcher = r.broker.launcher
            first = launcher.pid
            assert r.broker.lobby.ready  # it served: its lobby registered
            os.kill(first, signal.SIGKILL)
            for _ in range(2000):
                await asyncio.sleep(0.001)
                if launcher.pid not in (0, first):
                    break
            second = launcher.pid
            assert second not in (0, first), "not restarted at once"
            assert not r.broker.pool.launcher_served  # nothing of the new one registered yet
            os.kill(second, signal.SIGKILL)  # again, before any worker of it said hello: now it waits
            await asyncio.sleep(0.4)
            assert launcher.pid == second and launcher.sock is None
            assert r.broker.pool.launcher_backoff.delay == 1.0

    run(main())


def test_a_spare_not_forked_yet_is_written_off_at_once_and_its_late_fork_killed() -> None:
    """A spare the fork server has not forked yet (a hermes one preloads for seconds after a restart) holds
    nothing and cannot hear a stop: the ladder writes it off at once instead of waiting half the budget for
    its hello and then the rest, which held a shutdown for the whole stop budget."""
    async def main() -> None:
        async with running_broker(stop_timeout=4.0) as r:
            for _ in range(500):
                if r.broker.pool.spares:
                    break
                await asyncio.sleep(0.01)
            zygote = r.broker.launcher.pid
            os.kill(zygote, signal.SIGSTOP)  # it cannot fork the replacement spare
            try:
                c = r.client()
                assert "result" in await r.call(c, "session.create")  # takes the warm spare
                unborn = [w for w in r.broker.workers.values() if w.pid == 0 and w.kind == "spare"]
                assert len(unborn) == 1
                t0 = time.monotonic()
                await r.broker.stop(unborn[0], "surplus")
                assert time.monotonic() - t0 < 0.5  # was 4 s: 2 s waiting for a hello, then the SIGKILL step
                assert unborn[0] not in r.broker.workers.values()
            finally:
                os.kill(zygote, signal.SIGCONT)
            # the forks it queued happen now (the given-up spare's and the refill's): the given-up one is killed when
            # reported (Pool.on_launched), the refill is journaled as usual
            def strays() -> list[int]:
                return [p.pid for p in psutil.Process(zygote).children() if not gone(p.pid)
                        and p.pid not in r.broker.workers.by_pid]

            for _ in range(500):
                if all(w.pid for w in r.broker.workers.values()) and not strays():
                    break
                await asyncio.sleep(0.01)
            assert all(w.pid for w in r.broker.workers.values()) and not strays(), strays()

    run(main())
