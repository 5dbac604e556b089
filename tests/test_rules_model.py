"""Issue 3 acceptance 7: the reaper's rules as a hypothesis state machine with a fake clock.

The machine drives the broker's real detach table (supervisor.broker.sessions.SessionTable:
bind, attach, disconnect with its immediate close_on_disconnect check, touch, deliver), the
worker records' beat transitions (supervisor.broker.table), and the real decision function
of a reaper tick (supervisor.broker.rules.plan_tick), the same one Broker.tick acts on. Time only moves
when the machine says so; a tick runs every TICK seconds of fake time, as the
broker's loop does, and also at arbitrary moments in between.

Invariants: an attached session is never reaped; a busy one only for busy_stale (or a
lost heartbeat); a detached idle session is gone by reap_grace + one tick; a busy
detached one with no activity by busy_stale + one tick; a live worker never loses
its heartbeat.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from supervisor.broker.rules import BUSY_STATES, Limits, eviction_order, plan_tick, reap_reason
from supervisor.broker.sessions import SessionTable
from supervisor.broker.table import Session, Worker

TICK = 0.2
EPS = 1e-9
CONNS = st.integers(min_value=1, max_value=4)
PICK = st.integers(min_value=0, max_value=63)


@dataclass(eq=False)
class Conn:
    """A client connection as the detach table sees one (the front's Conn has the same three members)."""

    id: int
    closed: bool = False

    def send(self, data: str | bytes) -> None:
        pass


class ReaperMachine(RuleBasedStateMachine):
    @initialize(grace=st.sampled_from([0.0, 0.5, 1.0, 3.0]), stale=st.sampled_from([1.0, 2.5, 6.0]),
                interval=st.sampled_from([0.3, 1.0]), liveness=st.integers(min_value=2, max_value=4))
    def setup(self, grace: float, stale: float, interval: float, liveness: int) -> None:
        self.limits = Limits(reap_grace=grace, busy_stale=stale, heartbeat_interval=interval,
                             heartbeat_liveness=liveness)
        self.now = 1000.0
        self.next_tick = self.now + TICK
        self.sessions: dict[str, Session] = {}
        self.hung: set[str] = set()
        self.stopped: list[tuple[str, str]] = []
        self.ids = itertools.count(1)
        self.table = SessionTable(lambda: self.limits, lambda: 100, lambda: 1 << 20, self.stop)
        self.conns: dict[int, Conn] = {}

    def conn(self, n: int) -> Conn:
        """The live connection with number n; after a close, the same number is a new connection."""
        c = self.conns.get(n)
        if c is None or c.closed:
            c = self.conns[n] = Conn(n)
            self.table.connect(c)
        return c

    # -- helpers ----------------------------------------------------------------
    def pick(self, i: int) -> Session:
        live = sorted(self.sessions)
        return self.sessions[live[i % len(live)]]

    def stop(self, w: Worker, reason: str) -> None:
        s = w.session
        assert s is not None
        # the invariants of every single decision, against the state it was taken in
        if reason == "heartbeat_lost":
            assert s.sid in self.hung, f"a beating worker was declared hung ({s.sid})"
        else:
            assert not s.attached, f"reaped {s.sid} with {len(s.attached)} viewer(s) attached ({reason})"
            if s.state in BUSY_STATES:
                assert reason == "busy_stale", f"busy session reaped for {reason}"
                assert self.now - max(s.detached_at, s.last_active) >= self.limits.busy_stale - EPS
            else:
                assert reason == "ws_orphan_reap"
                assert s.close_on_disconnect or \
                    self.now - max(s.detached_at, s.last_active) >= self.limits.reap_grace - EPS
        w.stopping = reason  # what Broker.stop does first; the ladder itself is the broker's business
        w.state = "closing"
        self.stopped.append((s.sid, reason))
        del self.sessions[s.sid]
        self.hung.discard(s.sid)

    def run_tick(self) -> None:
        workers = [s.worker for s in self.sessions.values()]
        for w, reason in plan_tick(workers, list(self.sessions.values()), self.now, self.limits, hello_timeout=15):
            self.stop(w, reason)

    def beat_live_workers(self) -> None:
        """Every worker that is not hung sends a heartbeat each interval (a timer in its main loop)."""
        for s in self.sessions.values():
            if s.sid not in self.hung and self.now - s.worker.last_heartbeat >= self.limits.heartbeat_interval - EPS:
                s.worker.beat(self.now)

    # -- rules ------------------------------------------------------------------
    @rule(conn=CONNS, close_on_disconnect=st.booleans())
    def create(self, conn: int, close_on_disconnect: bool) -> None:
        n = next(self.ids)
        w = Worker(ident=f"w{n}".encode(), kind="session", spawned_at=self.now, pid=10_000 + n, ready=True,
                   state="idle", last_heartbeat=self.now)
        s = self.table.bind(w, f"s{n}", f"k{n}", close_on_disconnect, self.conn(conn), self.now)
        self.sessions[s.sid] = s

    @precondition(lambda self: self.sessions)
    @rule(i=PICK, conn=CONNS)
    def attach(self, i: int, conn: int) -> None:
        """resume / activate / prompt.submit from a connection (rule 1 and 3)."""
        self.table.attach(self.conn(conn), self.pick(i), self.now)

    @rule(conn=CONNS)
    def close_connection(self, conn: int) -> None:
        """Rule 2: the connection ends and detaches from every session; close_on_disconnect reaps at once."""
        c = self.conn(conn)
        c.closed = True
        self.table.disconnect(c, self.now)

    @precondition(lambda self: self.sessions)
    @rule(i=PICK, state=st.sampled_from(["working", "waiting"]))
    def turn_start(self, i: int, state: str) -> None:
        s = self.pick(i)
        self.table.touch(s, self.now)  # the gateway marks the session active when it routes prompt.submit
        if s.sid not in self.hung and s.worker.beat(self.now, state):  # it beats at once on a state change
            self.table.touch(s, self.now)  # as Broker._on_heartbeat

    @precondition(lambda self: self.sessions)
    @rule(i=PICK)
    def turn_end(self, i: int) -> None:
        s = self.pick(i)
        if s.sid not in self.hung and s.worker.beat(self.now, "idle"):
            self.table.touch(s, self.now)

    @precondition(lambda self: self.sessions)
    @rule(i=PICK)
    def event(self, i: int) -> None:
        """A streamed event: a frame (so a beat) and session activity."""
        s = self.pick(i)
        if s.sid not in self.hung:
            s.worker.beat(self.now)
            self.table.deliver(s, s.worker.seq + 1, b"{}", self.now)

    @precondition(lambda self: self.sessions)
    @rule(i=PICK)
    def hang(self, i: int) -> None:
        """SIGSTOP: the worker sends nothing any more."""
        self.hung.add(self.pick(i).sid)

    @rule(dt=st.floats(min_value=0.0, max_value=4.0, allow_nan=False))
    def advance(self, dt: float) -> None:
        """Move the clock; the broker's loop ticks every TICK seconds on the way."""
        end = self.now + dt
        while self.next_tick <= end:
            self.now = self.next_tick
            self.beat_live_workers()
            self.run_tick()
            self.next_tick += TICK
        self.now = end
        self.beat_live_workers()

    @rule()
    def tick_now(self) -> None:
        """A tick at an arbitrary moment (a late wake-up of the loop)."""
        self.run_tick()

    # -- invariants -------------------------------------------------------------
    @invariant()
    def nobody_overstays(self) -> None:
        if not hasattr(self, "limits"):
            return
        bound = TICK + EPS
        for s in self.sessions.values():
            if s.attached:
                continue
            assert s.detached_at is not None
            if s.sid in self.hung:
                assert self.now - s.worker.last_heartbeat < self.limits.heartbeat_timeout + bound
            elif s.state in BUSY_STATES:
                quiet_since = max(s.detached_at, s.last_active)
                assert self.now - quiet_since < self.limits.busy_stale + bound, f"busy {s.sid} never given up"
            else:
                idle_since = max(s.detached_at, s.last_active)
                limit = 0.0 if s.close_on_disconnect else self.limits.reap_grace
                assert self.now - idle_since < limit + bound, \
                    f"detached idle {s.sid} alive {self.now - idle_since:.3f}s > grace {limit} + tick"

    @invariant()
    def detach_table_is_consistent(self) -> None:
        for s in self.sessions.values():
            assert (s.detached_at is None) == bool(s.attached), s
            assert not s.worker.stopping


TestReaperRules = ReaperMachine.TestCase
TestReaperRules.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


# -- the pure rules, case by case (what the machine relies on) --------------------------------
LIM = Limits(reap_grace=2.0, busy_stale=10.0, heartbeat_interval=1.0, heartbeat_liveness=3)


@pytest.mark.parametrize("kw, expected", [
    ({"attached": 1, "detached_at": None, "last_active": 0, "state": "idle", "now": 99}, None),
    ({"attached": 0, "detached_at": 0.0, "last_active": 0, "state": "idle", "now": 1.9}, None),
    ({"attached": 0, "detached_at": 0.0, "last_active": 0, "state": "idle", "now": 2.0}, "ws_orphan_reap"),
    ({"attached": 0, "detached_at": 0.0, "last_active": 1.5, "state": "idle", "now": 3.0}, None),
    ({"attached": 0, "detached_at": 0.0, "last_active": 0, "state": "working", "now": 9.9}, None),
    ({"attached": 0, "detached_at": 0.0, "last_active": 0, "state": "waiting", "now": 10.0}, "busy_stale"),
    ({"attached": 1, "detached_at": None, "last_active": 0, "state": "working", "now": 99}, None),
    # a long silent turn the user watched: the stale clock starts when the last client leaves
    ({"attached": 0, "detached_at": 50.0, "last_active": 0, "state": "working", "now": 59.9}, None),
    ({"attached": 0, "detached_at": 50.0, "last_active": 0, "state": "working", "now": 60.0}, "busy_stale"),
])
def test_reap_reason_cases(kw: dict, expected: str | None) -> None:
    assert reap_reason(close_on_disconnect=False, limits=LIM, **kw) == expected


def test_close_on_disconnect_is_immediate_but_waits_for_the_turn() -> None:
    idle = dict(attached=0, detached_at=5.0, last_active=5.0, now=5.0, limits=LIM, close_on_disconnect=True)
    assert reap_reason(state="idle", **idle) == "ws_orphan_reap"
    assert reap_reason(state="working", **idle) is None


def test_eviction_prefers_the_longest_detached_idle_session() -> None:
    order = eviction_order([("a", 5.0, "idle"), ("b", None, "idle"), ("c", 1.0, "idle"), ("d", 0.5, "working")])
    assert order == ["c", "a"]


def test_replay_buffer_bounds_events_and_bytes_and_reports_truncation() -> None:
    s = Session(sid="s", key="k", worker=Worker(ident=b"w", kind="session"))
    for seq in range(1, 11):
        s.remember(seq, b"x" * 100, max_events=4, max_bytes=10_000)
    assert [q for q, _ in s.replay] == [7, 8, 9, 10]
    assert s.since(6) == ([b"x" * 100] * 4, False)
    assert s.since(3)[1] is True  # 4..6 were dropped: the caller is told
    for seq in range(11, 21):
        s.remember(seq, b"y" * 400, max_events=1000, max_bytes=1024)
    assert [q for q, _ in s.replay] == [19, 20] and s.replay_bytes == 800
