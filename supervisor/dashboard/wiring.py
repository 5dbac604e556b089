"""Mounts the dashboard on a running daemon: start the child, proxy the front's other paths, stop it first."""

from __future__ import annotations

from typing import Awaitable, Callable

from supervisor import log
from supervisor.broker.launcher import hermes_home_environment
from supervisor.clients.front import Front
from supervisor.config import Config
from supervisor.dashboard.keeper import DashboardError, DashboardKeeper
from supervisor.dashboard.proxy import DashboardProxy

_WILDCARD = {"", "0.0.0.0", "::"}


def child_env(cfg: Config, token: str) -> dict[str, str]:
    """What Hermes' dashboard reads at import: its home, its token, the host its PTYs dial."""
    env = hermes_home_environment(cfg.worker_config())
    env["HERMES_DASHBOARD_SESSION_TOKEN"] = token
    env["HERMES_DASHBOARD_WS_HOST"] = "127.0.0.1" if cfg.host in _WILDCARD else cfg.host
    return env


async def start_dashboard(cfg: Config, front: Front, token: str,
                          before_stopping: Callable[[Callable[[], Awaitable[None]]], None]) -> DashboardKeeper | None:
    """Start the child and mount the proxy; None (after a one-line error) when it cannot serve.
    `before_stopping` registers the dashboard's stop ahead of the daemon's other stopping hooks."""
    if front.tls is not None:
        log.error("--dashboard cannot run with TLS: Hermes' PTY children dial ws:// only (docs/dashboard.md)")
        return None
    keeper = DashboardKeeper(child_env(cfg, token), front.port, cfg.reap_grace)
    try:
        await keeper.start()
    except DashboardError as exc:
        log.error("--dashboard: " + str(exc))
        return None
    proxy = DashboardProxy(keeper.base_url, keeper.unavailable, lambda: front.port)
    front.set_fallback(proxy)

    async def stop() -> None:
        front.set_fallback(None)
        await keeper.stop()
        await proxy.close()

    before_stopping(stop)
    return keeper
