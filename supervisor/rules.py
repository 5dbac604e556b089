"""The lifecycle rules (design.md rules 4 and 5) as pure functions of a session's record and the clock.

The reaper tick calls these; the hypothesis model test drives them with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass

BUSY_STATES = frozenset({"working", "waiting"})


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
        # left to finish its turn; only a turn with no activity for busy_stale is given up on
        if now - last_active >= limits.busy_stale:
            return "busy_stale"
        return None
    if close_on_disconnect:
        return "ws_orphan_reap"
    if now - max(detached_at, last_active) >= limits.reap_grace:
        return "ws_orphan_reap"
    return None


def heartbeat_lost(*, last_heartbeat: float, now: float, limits: Limits) -> bool:
    return now - last_heartbeat >= limits.heartbeat_timeout


def eviction_order(candidates: list[tuple[str, float | None, str]]) -> list[str]:
    """Capacity: (sid, detached_at, state) -> detached idle sessions, longest-detached first."""
    idle = [(detached_at, sid) for sid, detached_at, state in candidates
            if detached_at is not None and state not in BUSY_STATES]
    return [sid for _, sid in sorted(idle)]
