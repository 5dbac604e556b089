"""The daemon, top to bottom: take the lock, clean up after a dead predecessor, start the broker and the
front, run until a signal, then drain and stop in order.

It is also what operations see of the gateway (ops.port.Supervised): a read-only
snapshot, the counts, accept/drain, kill, and hook registration.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any, Callable

from protocol import __version__
from supervisor import config as config_mod
from supervisor import log
from supervisor.broker.broker import Broker
from supervisor.broker.views import worker_row
from supervisor.clients.front import Front, url_for
from supervisor.clients.gateway import Gateway
from supervisor.config import Config
from supervisor.dashboard import rows as dashboard_rows
from supervisor.hooks import Hooks
from supervisor.ops.hangup import sighup_handler
from supervisor.ops.journal import Journal, kill_leftovers
from supervisor.ops.port import Snapshot
from supervisor.ops.wiring import Ops
from supervisor.paths import LockHeld, RuntimePaths
from supervisor.restart import predecessor
from supervisor.restart.channel import HandoverError
from supervisor.restart.successor import Takeover


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.paths = RuntimePaths(cfg.runtime_dir)
        self.runtime_root = self.paths.root
        self.journal = Journal(os.path.join(cfg.data_dir, "workers.json"))
        self.broker = Broker(cfg, self.paths, self.journal)
        self.gateway = Gateway(self.broker)
        self.front: Front | None = None
        self.dashboard = None  # supervisor.dashboard.keeper.DashboardKeeper with --dashboard
        self.token = ""
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        self._changed = Hooks[[]]("on_change")
        self.broker.on_change = self._changed.run
        self._routes: dict[str, Callable[..., Any]] = {}
        self._restarting = False
        self._successor = 0  # pid of the broker we handed over to
        self.successor_env: Callable[[], dict[str, str]] = dict  # what a successor needs of our environment
        self.on_restarting = Hooks[[]]("on_restarting")
        self.on_restart_failed = Hooks[[]]("on_restart_failed")
        self.on_handed_over = Hooks[[int]]("on_handed_over")
        self.on_took_over = Hooks[[]]("on_took_over")  # we are a restart's successor, serving
        # the lifecycle's extension points (operations hang off them: ops/wiring.py)
        self.on_ready = Hooks[[]]("on_ready")
        self.on_reloading = Hooks[[]]("on_reloading")  # SIGHUP received, before the file is read
        self.on_reload = Hooks[[dict]]("on_reload")
        self.on_stopping = Hooks[[]]("on_stopping")
        self.on_stopped = Hooks[[]]("on_stopped")  # workers finalized, about to exit
        self.on_sighup = sighup_handler(self.reload, self.stopping.set)  # reload as a service, stop in a terminal (supervisor/ops/hangup.py)

    # -- serve ------------------------------------------------------------------
    async def run(self) -> int:
        takeover = Takeover.from_env()  # a restart: our predecessor hands us its port, workers and tables
        self.paths.ensure()
        os.makedirs(self.cfg.data_dir, mode=0o700, exist_ok=True)
        if takeover is None:
            self._lock_fd = self.paths.lock()
            self._clean_up_after_predecessor()
            self.token = self.paths.write_token(self.cfg.token)
            tables = None
        else:
            self._lock_fd = takeover.lock_fd  # the same open lock: it was never released
            go = await takeover.ready()
            self.paths.claim_lock(self._lock_fd)
            self.token, tables = str(go["token"]), go["state"]
        self.front = Front(self.cfg, self.broker, self.gateway, self.token)
        self.front.http_routes.update(self._routes)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.on_sighup)
        loop.add_signal_handler(signal.SIGUSR2, lambda: loop.create_task(self._restart_on_signal()))
        if takeover is None:
            await self.broker.start()
            await self.front.start()
            if self.cfg.dashboard and not await self._start_dashboard():
                await self.shutdown()
                return 2
            if not await self.broker.lobby_ready():
                log.error("lobby worker did not register; global methods will fail until it does")
            self._announce()
        else:  # serve at once: the clients cut off by the hand-over are reconnecting now
            await takeover.adopt(self.broker, tables)
            await self.front.start(sock=takeover.listen[0])
            if self.cfg.dashboard:
                await self._start_dashboard()  # a new child; the predecessor's ends with its parent
            self._announce()
            self.on_took_over.run()
        await self.on_ready.run_async()
        if takeover is not None:
            await takeover.serving()  # the predecessor may go: port, link, control socket and tables are ours
        await self.stopping.wait()
        if self._successor:
            await self.on_stopped.run_async()  # operations close; the workers are the successor's
            log.info("gateway handed over; exiting", successor=self._successor)
            return 0 if self._successor > 0 else 1
        await self.shutdown()
        return 0

    # -- restart: hand everything to a successor running the code on disk ----------------------------
    async def restart(self) -> dict[str, Any]:
        """The control endpoint's `restart` and SIGUSR2 (supervisor/restart/). On success this process exits
        once the answer is out; on failure it goes on serving and the answer says why."""
        if self._restarting:
            raise HandoverError("a restart is already under way")
        if self.front is None or self.broker.closing:
            raise HandoverError("the gateway is not serving")
        self._restarting = True
        try:
            self.on_restarting.run()
            outcome = await predecessor.hand_over(self.broker, self.front, self._lock_fd, self.successor_env())
        except HandoverError as exc:
            if exc.past_cut:  # nothing left to serve with: exit, the workers end with the zygote
                self._successor = -1
                self.paths.remove_live_files()
                asyncio.get_running_loop().call_soon(self.stopping.set)
            else:
                self._restarting = False
                self.on_restart_failed.run()
            raise
        self._successor = outcome.pid
        self.on_handed_over.run(outcome.pid)
        asyncio.get_running_loop().call_later(0.2, self.stopping.set)  # let the answer go out first
        return predecessor.describe(outcome)

    async def _restart_on_signal(self) -> None:
        try:
            result = await self.restart()
            log.info("SIGUSR2: restarted", **result)
        except HandoverError as exc:
            log.error("SIGUSR2: restart failed; still serving", error=str(exc))

    def _clean_up_after_predecessor(self) -> None:
        left = self.journal.load()
        for entry in kill_leftovers(left):
            log.warning("killed a worker left by a previous broker", pid=entry.pid, kind=entry.kind,
                        session=entry.session)
        for entry in left:
            if entry.kind == "session" and entry.session:
                # its worker died with the previous broker (or was just killed) without finalizing:
                # the lobby records why, unless the row was ended already
                self.broker.note_end(entry.session, "gateway_lost")
        self.journal.clear()

    async def _start_dashboard(self) -> bool:
        """--dashboard: Hermes' dashboard in a supervised child behind the front (docs/dashboard.md)."""
        from supervisor.dashboard.wiring import start_dashboard

        assert self.front is not None
        self.dashboard = await start_dashboard(self.cfg, self.front, self.token, self.on_stopping.prepend)
        return self.dashboard is not None

    def _announce(self) -> None:
        url = url_for(self.cfg.host, self.front.port, self.token, tls=self.front.tls is not None)
        self.paths.write_info({
            "pid": os.getpid(), "host": self.cfg.host, "port": self.front.port, "url": url,
            "token_file": self.paths.token_file, "started_at": self.started_at, "version": __version__,
            "runtime_dir": self.paths.root, "data_dir": self.cfg.data_dir,
        })
        log.info("gateway listening", url=url.split("?")[0], pid=os.getpid(), runtime=self.cfg.runtime,
                 agent=self.cfg.agent, token_file=self.paths.token_file)
        self._banner(url)

    async def shutdown(self) -> None:
        """Stop accepting, finalize every worker, close every client, then the operations pieces."""
        t0 = time.monotonic()
        log.info("gateway stopping", sessions=len(self.broker.sessions.sessions))
        await self.on_stopping.run_async()
        assert self.front is not None
        await self.front.stop_accepting()
        await self.broker.shutdown()
        await self.front.close_all()
        self.paths.remove_live_files()
        await self.on_stopped.run_async()
        log.info("gateway stopped", took=round(time.monotonic() - t0, 3))

    def reload(self) -> None:
        """SIGHUP: re-read the config file and apply lifecycle values to the running table."""
        self.on_reloading.run()
        if not self.cfg.config:
            log.info("SIGHUP: no config file to reload")
            return
        try:
            fresh = config_mod.read_file(self.cfg.config)
        except config_mod.ConfigError as exc:
            log.error("SIGHUP: config not reloaded", error=str(exc))
            return
        changed = {}
        for key in config_mod.LIFECYCLE_KEYS:
            if key in fresh:
                try:
                    value = config_mod._convert(key, fresh[key], self.cfg.config)
                except config_mod.ConfigError as exc:
                    log.error("SIGHUP: config not reloaded", error=str(exc))
                    return
                if getattr(self.cfg, key) != value:
                    changed[key] = (getattr(self.cfg, key), value)
        for key, (_, value) in changed.items():
            setattr(self.cfg, key, value)
        if "log_level" in changed:
            log.set_level(self.cfg.log_level)
        log.info("config reloaded", changed=",".join(f"{k}:{a}->{b}" for k, (a, b) in changed.items()) or "nothing")
        self.on_reload.run(changed)
        self.broker.pool.refill()

    def _banner(self, url: str) -> None:
        if not sys.stdout.isatty():  # a journal or a file: never the token, only where it is
            url = url.split("?")[0] + f"?token=$(cat {self.paths.token_file})"
        print(f"hermes-gateway {__version__} listening on {url.split('?')[0]}\n"
              f"  token file:  {self.paths.token_file}\n"
              f"  Hermes TUI:  hermes-gateway tui --runtime-dir {self.paths.root}  (make tui in the source tree)\n"
              f'  clients:     HERMES_TUI_GATEWAY_URL="{url}"\n'
              f"  workers:     hermes-ps --runtime-dir {self.paths.root}", flush=True)

    # -- what operations see (ops.port.Supervised) --------------------------------
    def snapshot(self) -> Snapshot:
        b = self.broker
        now, wall = time.monotonic(), time.time()
        gateway = {
            "pid": os.getpid(), "version": __version__, "started_at": self.started_at,
            "uptime": round(wall - self.started_at, 3), "accepting": b.accepting, "closing": b.closing,
            "counts": b.counts(), "reaps": dict(b.reaps), "runtime_dir": self.paths.root,
            "port": self.front.port if self.front else None, "host": self.cfg.host,
            "config": self.cfg.public(), "stops": sum(b.reaps.values()),
            "dropped_frames": dict(b.link.dropped_frames),
        }
        rows = [worker_row(w, now, wall) for w in b.workers.values()] + dashboard_rows.rows(self.dashboard, wall)
        return Snapshot(gateway=gateway, workers=rows,
                        rpc_counts=dict(self.gateway.rpc_counts),
                        rejected=dict(self.front.rejected) if self.front else {})

    def counts(self) -> dict[str, int]:
        return self.broker.counts()

    def accepting(self) -> bool:
        return self.broker.accepting

    def set_accepting(self, accepting: bool) -> bool:
        return self.broker.set_accepting(accepting)

    def targets(self) -> list[tuple[int, float]]:
        return [(w.pid, w.create_time) for w in self.broker.workers.values() if w.pid] + \
            dashboard_rows.targets(self.dashboard)

    async def kill(self, target: Any, reason: str) -> dict[str, Any] | None:
        b = self.broker
        w = None
        if isinstance(target, str) and target:
            s = b.sessions.find(target)
            w = s.worker if s is not None else None
            if w is None and target.isdigit():
                target = int(target)
        if w is None and isinstance(target, int) and not isinstance(target, bool):
            w = b.workers.by_pid.get(target)
        if w is None:
            return None
        s = w.session
        log.info("operator kill", session=s.sid if s else "", pid=w.pid, kind=w.kind, reason=reason)
        t0 = time.monotonic()
        await b.stop(w, reason)
        return {"session": s.sid if s else "", "key": s.key if s else "", "pid": w.pid, "kind": w.kind,
                "reason": w.stopping or reason, "took": round(time.monotonic() - t0, 3)}

    def on_change(self, fn: Callable[[], None]) -> None:
        self._changed.append(fn)

    def on_worker_stopped(self, fn: Callable[[str, float], None]) -> None:
        self.broker.ladder.on_stopped.append(fn)

    def add_route(self, path: str, handler: Callable[..., Any]) -> None:
        self._routes[path] = handler
        if self.front is not None:
            self.front.http_routes[path] = handler


def run(cfg: Config) -> int:
    log.setup(cfg.log_level, cfg.log_format)
    daemon = Daemon(cfg)
    ops = Ops(daemon, daemon.paths.control_endpoint)
    daemon.on_ready.append(ops.ready)
    daemon.on_reloading.append(ops.reloading)
    daemon.on_reload.append(ops.reload)
    daemon.on_stopping.append(ops.stopping)
    daemon.on_stopped.append(ops.stopped)
    daemon.on_restarting.append(ops.restarting)
    daemon.on_restart_failed.append(ops.restart_failed)
    daemon.on_handed_over.append(ops.handed_over)
    daemon.on_took_over.append(ops.took_over)
    daemon.successor_env = ops.successor_env
    try:
        return asyncio.run(daemon.run())
    except HandoverError as exc:  # a restart's successor whose predecessor gave up before `go`
        print(f"hermes-gateway: restart abandoned: {exc}", file=sys.stderr)
        return 1
    except LockHeld as exc:
        print(f"hermes-gateway: {exc}; not starting a second daemon on {cfg.runtime_dir}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"hermes-gateway: cannot start: {exc}", file=sys.stderr)
        return 1
