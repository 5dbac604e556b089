"""Mounts the dashboard on a running daemon: start the child, proxy the front's other paths, stop it first."""

from __future__ import annotations

from typing import TYPE_CHECKING

from supervisor import log
from supervisor.dashboard.keeper import DashboardError, DashboardKeeper
from supervisor.dashboard.proxy import DashboardProxy

if TYPE_CHECKING:
    from supervisor.daemon import Daemon

_WILDCARD = {"", "0.0.0.0", "::"}


def child_env(daemon: "Daemon") -> dict[str, str]:
    """What Hermes' dashboard reads at import: its home, its token, the host its PTYs dial."""
    from worker.hermes_home import prepare

    env = prepare(daemon.cfg.worker_config())
    env["HERMES_DASHBOARD_SESSION_TOKEN"] = daemon.token
    env["HERMES_DASHBOARD_WS_HOST"] = "127.0.0.1" if daemon.cfg.host in _WILDCARD else daemon.cfg.host
    return env


async def start_dashboard(daemon: "Daemon") -> bool:
    """Start the child and mount the proxy; False (after a one-line error) when it cannot serve."""
    front = daemon.front
    assert front is not None
    if front.tls is not None:
        log.error("--dashboard cannot run with TLS: Hermes' PTY children dial ws:// only (docs/dashboard.md)")
        return False
    keeper = DashboardKeeper(child_env(daemon), front.port, daemon.cfg.reap_grace)
    try:
        await keeper.start()
    except DashboardError as exc:
        log.error("--dashboard: " + str(exc))
        return False
    proxy = DashboardProxy(keeper.base_url, keeper.unavailable, lambda: front.port)
    front.set_fallback(proxy)

    async def stop() -> None:
        front.set_fallback(None)
        await keeper.stop()
        await proxy.close()

    daemon.on_stopping.insert(0, stop)
    daemon.dashboard = keeper
    return True
