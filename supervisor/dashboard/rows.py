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


def rows(keeper: "DashboardKeeper | None", wall: float, figures: dict) -> list[dict[str, Any]]:
    out = []
    for pid, created in targets(keeper):
        fig = figures.get(pid)
        kind = "dashboard" if pid == keeper.state.pid else "dashboard-pty"
        out.append({
            "session": "", "key": "", "pid": pid, "kind": kind, "state": "serving" if keeper.state.port else
            "restarting", "stopping": "", "attached": 0, "detached_for": None, "idle": None,
            "heartbeat_age": None, "uptime": round(max(0.0, wall - created), 3),
            "cpu": fig.cpu if fig else 0.0, "rss": fig.rss if fig else 0, "uss": fig.uss if fig else 0,
            "threads": fig.threads if fig else 0, "fds": fig.fds if fig else 0,
            "children": fig.children if fig else 0, "title": "", "model": "", "message_count": 0,
        })
    return out
