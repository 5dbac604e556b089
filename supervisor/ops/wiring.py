"""Wire the operations pieces into a Daemon through its hooks (nothing here is on the request path).

sd_notify, the process title, the control endpoint, /metrics, the [MEMORY] line and
the per-worker sampler all hang off Daemon.on_ready / on_reloading / on_reload /
on_stopping / on_stopped and Broker.on_change.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from supervisor import log
from supervisor.ops.control import ControlServer
from supervisor.ops.monitor import Monitor
from supervisor.ops.sampler import Sampler
from supervisor.ops.sdnotify import Notifier

if TYPE_CHECKING:
    from supervisor.daemon import Daemon


def status_text(counts: dict[str, int], accepting: bool) -> str:
    text = (f"{counts['sessions']} sessions ({counts['attached']} attached, {counts['detached']} detached), "
            f"{counts['workers']} workers, {counts['clients']} clients")
    return text if accepting else text + ", draining"


def set_title(text: str) -> None:
    try:
        from setproctitle import setproctitle

        setproctitle(text)
    except ImportError:
        pass


class Ops:
    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.notifier = Notifier.from_env()  # before the broker starts the fork server: no env leak
        self.sampler = Sampler()
        self.control = ControlServer(daemon, self.sampler)
        self.monitor = Monitor(daemon)
        self.metrics = None
        self._title = ""
        self._flush_pending = False
        self._live = False
        try:
            from supervisor.ops.metrics import Metrics

            self.metrics = Metrics(daemon, self.sampler)
        except ImportError as exc:  # prometheus-client is a dependency; a broken install must not stop the daemon
            log.error("metrics disabled: prometheus-client is not importable", error=str(exc))
        previous = daemon.broker.on_change

        def on_change() -> None:
            previous()
            self.changed()

        daemon.broker.on_change = on_change
        daemon.on_ready += [self.ready]
        daemon.on_reloading += [self.reloading]
        daemon.on_reload += [self.monitor.on_reload]
        daemon.on_stopping += [self.stopping]
        daemon.on_stopped += [self.stopped]
        self.update_title()

    # -- change: STATUS= and the process title, once per loop iteration --------
    def changed(self) -> None:
        if self._flush_pending:
            return
        self._flush_pending = True
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:
            self._flush_pending = False

    def flush(self) -> None:
        self._flush_pending = False
        self.update_title()
        if self._live:
            b = self.daemon.broker
            self.notifier.status(status_text(b.counts(), b.accepting))

    def update_title(self) -> None:
        n = self.daemon.broker.counts()["sessions"]
        title = f"hermes-gateway: {n} sessions"
        if title != self._title:
            self._title = title
            set_title(title)

    # -- hooks ------------------------------------------------------------------
    def ready(self) -> None:
        if self.metrics is not None:
            self.metrics.install()
        self.control.start()
        self.sampler.start(self.control.targets)
        self.monitor.start()
        b = self.daemon.broker
        self._live = True
        self.notifier.ready(status_text(b.counts(), b.accepting))
        self.notifier.start_watchdog()

    def reloading(self) -> None:
        """SIGHUP: RELOADING=1 now; READY=1 once the (synchronous) reload has run, whatever its outcome."""
        self.notifier.reloading()
        b = self.daemon.broker

        def done() -> None:
            self.notifier.ready(status_text(b.counts(), b.accepting))

        asyncio.get_running_loop().call_soon(done)

    def stopping(self) -> None:
        self._live = False
        self.notifier.stopping()

    def stopped(self) -> None:
        self.control.close()
        self.sampler.close()
        self.monitor.stop()
        self.notifier.close()


def install(daemon: "Daemon") -> Ops:
    return Ops(daemon)
