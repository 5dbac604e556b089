"""The lifecycle rules (docs/lifecycle.md, rules 4, 5 and 8) as pure functions of a session's record and the clock.

The reaper tick (broker.py) and the detach table's immediate check (sessions.py) call
these; tests/test_rules_model.py drives them with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from protocol.lifecycle import BUSY_STATES

if TYPE_CHECKING:
    from supervisor.broker.table import Session, Worker



@dataclass(frozen=True, slots=True)
class Limits:
    reap_grace: float
    busy_stale: float
    heartbeat_interval: float
    heartbeat_liveness: int

    @property
    def heartbeat_timeout(self) -> float:
        return self.heartbeat_interval * self.heartbeat_liveness


def reap_reason(*, attached: int, detached_at: float | None, last_active: float, state: str,
                close_on_disconnect: bool, now: float, limits: Limits) -> str | None:
    """Why a session should be stopped now, or None. Never for an attached session."""
    if attached > 0 or detached_at is None:
        return None
    if state in BUSY_STATES:
        # left to finish its turn; only a turn with no activity for busy_stale since the last client
        # left is given up on (a refresh must not kill a long, silent tool call the user was watching)
        if now - max(detached_at, last_active) >= limits.busy_stale:
            return "busy_stale"
        return None
    if close_on_disconnect:
        return "ws_orphan_reap"
    if now - max(detached_at, last_active) >= limits.reap_grace:
        return "ws_orphan_reap"
    return None


def heartbeat_lost(*, last_heartbeat: float, now: float, limits: Limits) -> bool:
    return now - last_heartbeat >= limits.heartbeat_timeout


def plan_tick(workers: Iterable["Worker"], sessions: Iterable["Session"], now: float, limits: Limits,
              hello_timeout: float) -> list[tuple["Worker", str]]:
    """One reaper tick's decisions, without acting: (worker, reason) for every worker to stop now.

    Hung workers (no frame for liveness x interval) and workers that never registered
    first, then every session by rule 4. Workers already stopping are left alone.
    """
    out: list[tuple[Worker, str]] = []
    doomed: set[int] = set()
    for w in workers:
        if w.stopping:
            continue
        if not w.ready:
            if now - w.spawned_at > hello_timeout:
                out.append((w, "heartbeat_lost"))
                doomed.add(id(w))
            continue
        if heartbeat_lost(last_heartbeat=w.last_heartbeat, now=now, limits=limits):
            out.append((w, "heartbeat_lost"))
            doomed.add(id(w))
    for s in sessions:
        w = s.worker
        if w.stopping or id(w) in doomed:
            continue
        reason = session_reap_reason(s, now, limits)
        if reason is not None:
            out.append((w, reason))
    return out


def session_reap_reason(s: "Session", now: float, limits: Limits) -> str | None:
    """Rule 4 for one session record (the tick's, and the immediate check when a last client leaves)."""
    return reap_reason(attached=len(s.attached), detached_at=s.detached_at, last_active=s.last_active,
                       state=s.state, close_on_disconnect=s.close_on_disconnect, now=now, limits=limits)


def eviction_order(candidates: list[tuple[str, float | None, str]]) -> list[str]:
    """Capacity: (sid, detached_at, state) -> detached idle sessions, longest-detached first."""
    idle = [(detached_at, sid) for sid, detached_at, state in candidates
            if detached_at is not None and state not in BUSY_STATES]
    return [sid for _, sid in sorted(idle)]
