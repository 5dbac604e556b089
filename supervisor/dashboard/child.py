"""The dashboard child: Hermes' own dashboard app (hermes_cli.web_server.app) on a private loopback port.

Run by the gateway as `python -m supervisor.dashboard.child`; the gateway sets
HERMES_HOME and HERMES_DASHBOARD_SESSION_TOKEN (Hermes reads both at import) and
HERMES_DASHBOARD_WS_HOST, so the PTYs' TUIs dial the gateway's own /api/ws and /api/pub.
Prints `DASHBOARD_READY port=N` once serving, or `DASHBOARD_FAILED <reason>` and exits 2.
Only public module attributes are used: `app`, `app.state.bound_host/bound_port/auth_required`,
`PTY_REGISTRY` (replaced with a registry whose lifetime is the gateway's reap_grace) and
`pty_session.PtySessionRegistry`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
import time

from supervisor.dashboard.procs import descendants, kill_all

READY = "DASHBOARD_READY"
FAILED = "DASHBOARD_FAILED"
PTY_MAX = 16
PTY_BUFFER = 1024 * 1024


def _fail(reason: str) -> int:
    print(f"{FAILED} {reason}", flush=True)
    return 2


def _watch_gateway(parent: int, on_orphan, interval: float = 0.2) -> None:
    """Call on_orphan once the gateway that started us is gone (we are re-parented)."""
    def run() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        on_orphan()

    threading.Thread(target=run, name="gateway-watch", daemon=True).start()


def _orphaned(_code: int = 0) -> None:
    """The gateway is gone: take every PTY and TUI below us, then leave at once."""
    kill_all(descendants(os.getpid()))
    os._exit(0)


async def _reap_ptys(registry, every: float) -> None:
    """Hermes' own reaper runs every 60 s; a tab's PTY must go after reap_grace."""
    while True:
        await asyncio.sleep(every)
        try:
            await registry.reap_idle()
        except Exception as exc:  # a failed close must not stop the next round
            print(f"dashboard: PTY reap failed: {exc}", file=sys.stderr, flush=True)


async def _serve(args: argparse.Namespace, sock: socket.socket) -> int:
    import uvicorn
    from hermes_cli import web_server
    from hermes_cli.pty_session import PtySessionRegistry

    web_server.PTY_REGISTRY = PtySessionRegistry(ttl=args.pty_ttl, max_sessions=PTY_MAX, buffer_cap=PTY_BUFFER,
                                                 read_timeout=0.2)
    app = web_server.app
    app.state.bound_host = "127.0.0.1"  # the proxy presents loopback Host/Origin after the gateway's own checks
    app.state.bound_port = args.public_port  # PTY children dial the gateway's port, not ours
    app.state.auth_required = False
    config = uvicorn.Config(app, log_level="warning", ws_ping_interval=None, ws_ping_timeout=None,
                            timeout_graceful_shutdown=1, lifespan="on")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            return _fail("Hermes' dashboard app did not start (see the log above)")
        await asyncio.sleep(0.05)
    print(f"{READY} port={sock.getsockname()[1]}", flush=True)
    reaper = asyncio.create_task(_reap_ptys(web_server.PTY_REGISTRY, max(0.25, min(args.pty_ttl / 2, 5.0))))
    try:
        await serving
    finally:
        reaper.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="supervisor.dashboard.child")
    p.add_argument("--public-port", type=int, required=True)
    p.add_argument("--pty-ttl", type=float, required=True)
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args(argv)
    _watch_gateway(args.parent, _orphaned)
    try:
        import hermes_cli.web_server  # noqa: F401  (reads HERMES_HOME and the token at import)
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return _fail(f"hermes-agent's dashboard cannot be imported ({exc}); install the hermes extra")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", 0))
    except OSError as exc:
        return _fail(f"no private loopback port: {exc}")
    sock.listen(128)
    try:
        return asyncio.run(_serve(args, sock))
    finally:
        kill_all(descendants(os.getpid()))


if __name__ == "__main__":
    sys.exit(main())
