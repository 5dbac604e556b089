"""Wire the operations pieces to the running gateway (nothing here is on the request path).

sd_notify, the process title, the control endpoint, /metrics, the [MEMORY] line and
the per-worker sampler hang off the daemon's lifecycle hooks (ready, reloading,
reload, stopping, stopped) and see the gateway only through ops.port.Supervised.
"""

from __future__ import annotations

import asyncio
import os

from protocol.titles import gateway_title, set_title
from supervisor import log
from supervisor.ops.control import ControlServer
from supervisor.ops.monitor import Monitor
from supervisor.ops.port import Supervised
from supervisor.ops.sampler import Sampler
from supervisor.ops.sdnotify import Notifier


def status_text(counts: dict[str, int], accepting: bool) -> str:
    text = (f"{counts['sessions']} sessions ({counts['attached']} attached, {counts['detached']} detached), "
            f"{counts['workers']} workers, {counts['clients']} clients")
    return text if accepting else text + ", draining"


class Ops:
    def __init__(self, gateway: Supervised, control_endpoint: str) -> None:
        self.gateway = gateway
        self.notifier = Notifier.from_env()  # before the broker starts the fork server: no env leak
        self.sampler = Sampler()
        self.control = ControlServer(gateway, control_endpoint, self.sampler)
        self.monitor = Monitor(gateway)
        self.metrics = None
        self._title = ""
        self._flush_pending = False
        self._live = False
        self._handed_over = False  # a restart's successor serves: its sockets and files are not ours to remove
        try:
            from supervisor.ops.metrics import Metrics

            self.metrics = Metrics(gateway, self.sampler)
        except ImportError as exc:  # prometheus-client is a dependency; a broken install must not stop the daemon
            log.error("metrics disabled: prometheus-client is not importable", error=str(exc))
        gateway.on_change(self.changed)
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
            self.notifier.status(status_text(self.gateway.counts(), self.gateway.accepting()))

    def update_title(self) -> None:
        title = gateway_title(self.gateway.counts()["sessions"])
        if title != self._title:
            self._title = title
            set_title(title)

    # -- hooks ------------------------------------------------------------------
    def ready(self) -> None:
        if self.metrics is not None:
            self.metrics.install()
        self.control.start()
        self.sampler.start(self.gateway.targets)
        self.monitor.start()
        self._live = True
        self.notifier.ready(status_text(self.gateway.counts(), self.gateway.accepting()))
        self.notifier.start_watchdog()

    def reloading(self) -> None:
        """SIGHUP: RELOADING=1 now; READY=1 once the (synchronous) reload has run, whatever its outcome."""
        self.notifier.reloading()

        def done() -> None:
            self.notifier.ready(status_text(self.gateway.counts(), self.gateway.accepting()))

        asyncio.get_running_loop().call_soon(done)

    def reload(self, changed: dict) -> None:
        self.monitor.on_reload(changed)

    def restarting(self) -> None:
        self.notifier.reloading()

    def restart_failed(self) -> None:
        self.notifier.ready(status_text(self.gateway.counts(), self.gateway.accepting()))

    def successor_env(self) -> dict[str, str]:
        """A restart's successor reports to the same service manager (we removed these from our environment)."""
        return self.notifier.environment()

    def handed_over(self, pid: int) -> None:
        """The successor serves: it is the service's main process now (systemd: MAINPID=, NotifyAccess=all)."""
        self._live = False
        self._handed_over = True
        self.notifier.notify(f"MAINPID={pid}")
        self.notifier.stop_watchdog()

    def took_over(self) -> None:
        self.notifier.notify(f"MAINPID={os.getpid()}")  # before READY=1: the service's main process is us

    def stopping(self) -> None:
        self._live = False
        self.notifier.stopping()

    def stopped(self) -> None:
        self.control.close(unlink=not self._handed_over)
        self.sampler.close()
        self.monitor.stop()
        self.notifier.close()
