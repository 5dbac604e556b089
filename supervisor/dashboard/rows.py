"""The dashboard child and its PTY processes as rows of `hermes-ps -a` (same fields as a worker's row)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from supervisor.dashboard.keeper import DashboardKeeper


def targets(keeper: "DashboardKeeper | None") -> list[tuple[int, float]]:
    """(pid, create time) of the child and everything below it, for the sampler."""
    out = []
    for pid in keeper.pids() if keeper is not None else []:
        try:
            out.append((pid, psutil.Process(pid).create_time()))
        except psutil.Error:
            pass
    return out


def rows(keeper: "DashboardKeeper | None", wall: float) -> list[dict[str, Any]]:
    """Rows like supervisor/broker/views.worker_row's; the sampler's figures are added by the control socket."""
    out = []
    for pid, created in targets(keeper):
        kind = "dashboard" if pid == keeper.state.pid else "dashboard-pty"
        out.append({
            "session": "", "key": "", "pid": pid, "kind": kind, "state": "serving" if keeper.state.port else
            "restarting", "stopping": "", "attached": 0, "detached_for": None, "idle": None,
            "heartbeat_age": None, "uptime": round(max(0.0, wall - created), 3),
            "title": "", "model": "", "message_count": 0,
        })
    return out
