"""sd_notify without libsystemd: one datagram per message to $NOTIFY_SOCKET.

systemd's `Type=notify` contract, implemented with the stdlib so the daemon has no
C dependency: READY=1 once clients can connect, STATUS= on change, WATCHDOG=1 from
the event loop (a wedged loop stops the pings and systemd restarts us), STOPPING=1
and RELOADING=1 with MONOTONIC_USEC. Outside systemd every call is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from supervisor import log


def _address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET as a socket address: a path, or an abstract name when it starts with '@'."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other families are not used for a local daemon


class Notifier:
    """Talks to the service manager; `enabled` is False when there is none."""

    def __init__(self, address: str | bytes | None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sent: int = 0
        self._sock: socket.socket | None = None
        self._last_status = ""
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, unset: bool = True) -> "Notifier":
        """Read NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID, and (by default) remove them from
        os.environ so the fork server and workers do not inherit a socket that is not theirs."""
        env = os.environ if environ is None else environ
        address = _address(env.get("NOTIFY_SOCKET", ""))
        usec = 0
        try:
            usec = int(env.get("WATCHDOG_USEC", "0") or 0)
            wd_pid = int(env.get("WATCHDOG_PID", "0") or 0)
            if wd_pid and wd_pid != os.getpid():
                usec = 0  # the watchdog is meant for another process
        except ValueError:
            usec = 0
        if unset and environ is None:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, max(0, usec))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send `KEY=value` lines as one datagram; False (and a log line) if it could not be sent."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
            self.sent += 1
            return True
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc), message=lines[0] if lines else "")
            return False

    def environment(self) -> dict[str, str]:
        """NOTIFY_SOCKET and WATCHDOG_USEC as we found them, for a restart's successor."""
        if not self.address:
            return {}
        addr = self.address
        text = "@" + addr[1:].decode() if isinstance(addr, bytes) else addr
        env = {"NOTIFY_SOCKET": text}
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        return env

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))
        if status:
            self._last_status = status

    def status(self, text: str) -> None:
        """STATUS=, only when the text changed (on_change fires far more often than the counts move)."""
        if text != self._last_status:
            self._last_status = text
            self.notify(f"STATUS={text}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping: finalizing workers")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    # -- watchdog -------------------------------------------------------------
    @property
    def watchdog_interval(self) -> float:
        """Seconds between pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else 0.0

    def start_watchdog(self) -> None:
        """Ping from the event loop itself: if the loop wedges, the pings stop and systemd acts."""
        if not self.enabled or not self.watchdog_usec or self._watchdog is not None:
            return
        loop = asyncio.get_running_loop()
        interval = self.watchdog_interval

        def ping() -> None:
            self.notify("WATCHDOG=1")
            self._watchdog = loop.call_later(interval, ping)

        ping()
        log.info("systemd watchdog on", every=round(interval, 3))

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def close(self) -> None:
        self.stop_watchdog()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
