"""Rows of the tables as plain data, for hermes-ps, /metrics and session.active_list's neighbours."""

from __future__ import annotations

from typing import Any

from protocol import lifecycle
from supervisor.broker.table import Worker


def worker_row(w: Worker, now: float, wall: float) -> dict[str, Any]:
    """What `list` says about one worker: identity and lifecycle (the sampler adds the process figures)."""
    s = w.session
    if s is not None:
        detached_for = round(now - s.detached_at, 3) if s.detached_at is not None and not s.attached else None
        idle = 0.0 if w.state in lifecycle.BUSY_STATES else round(now - s.last_active, 3)
    else:
        detached_for = None
        idle = round(now - w.spawned_at, 3) if w.kind == lifecycle.SPARE else None
    uptime = wall - w.create_time if w.create_time else now - w.spawned_at
    return {
        "session": s.sid if s else "", "key": s.key if s else "", "pid": w.pid, "kind": w.kind,
        "state": w.state, "stopping": w.stopping or "", "attached": len(s.attached) if s else 0,
        "detached_for": detached_for, "idle": idle, "heartbeat_age": round(now - w.last_heartbeat, 3),
        "uptime": round(max(0.0, uptime), 3),
        "title": str(w.meta.get("title") or "") if s else "", "model": str(w.meta.get("model") or "") if s else "",
        "message_count": int(w.meta.get("message_count") or 0) if s else 0,
    }
