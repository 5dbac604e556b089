"""The daemon: take the lock, clean up after a dead predecessor, start broker and front, run until a signal."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Awaitable, Callable

from protocol import __version__
from supervisor import config as config_mod
from supervisor import log
from supervisor.ops import wiring as ops
from supervisor.broker.broker import Broker
from supervisor.config import Config
from supervisor.clients.front import Front, url_for
from supervisor.clients.gateway import Gateway
from supervisor.ops.journal import Journal, kill_leftovers
from supervisor.paths import LockHeld, RuntimePaths


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.paths = RuntimePaths(cfg.runtime_dir)
        self.journal = Journal(os.path.join(cfg.data_dir, "workers.json"))
        self.broker = Broker(cfg, self.paths, self.journal)
        self.gateway = Gateway(self.broker)
        self.front: Front | None = None
        self.dashboard = None  # supervisor.dashboard.keeper.DashboardKeeper with --dashboard
        self.token = ""
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        # extension points for operations (sd_notify, metrics, control endpoint, monitor)
        self.on_ready: list[Callable[[], Awaitable[None] | None]] = []
        self.on_stopping: list[Callable[[], Awaitable[None] | None]] = []
        self.on_reload: list[Callable[[dict], None]] = []
        self.on_reloading: list[Callable[[], None]] = []  # SIGHUP received, before the file is read
        self.on_stopped: list[Callable[[], Awaitable[None] | None]] = []  # workers finalized, about to exit

    async def run(self) -> int:
        self.paths.ensure()
        os.makedirs(self.cfg.data_dir, mode=0o700, exist_ok=True)
        self._lock_fd = self.paths.lock()
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
        self.token = self.paths.write_token(self.cfg.token)
        self.front = Front(self.cfg, self.broker, self.gateway, self.token)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.broker.start()
        await self.front.start()
        if self.cfg.dashboard:
            from supervisor.dashboard.wiring import start_dashboard
            if not await start_dashboard(self):
                await self.shutdown()
                return 2
        if not await self.broker.lobby_ready():
            log.error("lobby worker did not register; global methods will fail until it does")
        url = url_for(self.cfg.host, self.front.port, self.token, tls=self.front.tls is not None)
        self.paths.write_info({
            "pid": os.getpid(), "host": self.cfg.host, "port": self.front.port, "url": url,
            "token_file": self.paths.token_file, "started_at": self.started_at, "version": __version__,
            "runtime_dir": self.paths.root, "data_dir": self.cfg.data_dir,
        })
        log.info("gateway listening", url=url.split("?")[0], pid=os.getpid(), runtime=self.cfg.runtime,
                 agent=self.cfg.agent, token_file=self.paths.token_file)
        self._banner(url)
        for hook in self.on_ready:
            await _maybe(hook())
        await self.stopping.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        t0 = time.monotonic()
        log.info("gateway stopping", sessions=len(self.broker.sessions))
        for hook in self.on_stopping:
            await _maybe(hook())
        assert self.front is not None
        await self.front.stop_accepting()
        self.broker.accepting = False
        await self.broker.shutdown()
        await self.front.close_all()
        self.paths.remove_live_files()
        for hook in self.on_stopped:
            await _maybe(hook())
        log.info("gateway stopped", took=round(time.monotonic() - t0, 3))

    def reload(self) -> None:
        """SIGHUP: re-read the config file and apply lifecycle values to the running table."""
        for hook in self.on_reloading:
            hook()
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
        for hook in self.on_reload:
            hook(changed)
        self.broker.refill()

    def _banner(self, url: str) -> None:
        if not sys.stdout.isatty():  # a journal or a file: never the token, only where it is
            url = url.split("?")[0] + f"?token=$(cat {self.paths.token_file})"
        print(f"hermes-gateway {__version__} listening on {url.split('?')[0]}\n"
              f"  token file:  {self.paths.token_file}\n"
              f"  Hermes TUI:  HERMES_TUI_GATEWAY_URL=\"{url}\" hermes\n"
              f"  workers:     hermes-ps --runtime-dir {self.paths.root}", flush=True)


async def _maybe(result: Awaitable[None] | None) -> None:
    if asyncio.iscoroutine(result):
        await result


def run(cfg: Config) -> int:
    log.setup(cfg.log_level, cfg.log_format)
    daemon = Daemon(cfg)
    ops.install(daemon)
    try:
        return asyncio.run(daemon.run())
    except LockHeld as exc:
        print(f"hermes-gateway: {exc}; not starting a second daemon on {cfg.runtime_dir}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"hermes-gateway: cannot start: {exc}", file=sys.stderr)
        return 1
