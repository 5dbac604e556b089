"""What SIGHUP means to this gateway: the terminal went away, or (for a service) "reload your config".

A program in the foreground of a terminal ends when the terminal closes (the kernel sends SIGHUP);
a gateway that took it as "reload" lived on without a terminal, holding its port. Under systemd or
launchd there is no controlling terminal (and systemd sets NOTIFY_SOCKET for Type=notify), and there
SIGHUP is `systemctl reload`. `nohup` (SIGHUP ignored when we start) asks to outlive the terminal, so
that keeps "reload" too. Decided once, at start, before sd_notify takes NOTIFY_SOCKET out of the environment.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Mapping

from supervisor import log


def has_controlling_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
    except OSError:  # ENXIO: no controlling terminal
        return False
    os.close(fd)
    return True


def sighup_reloads(environ: Mapping[str, str] | None = None, tty: bool | None = None,
                   inherited: object = None) -> bool:
    """True: SIGHUP re-reads the config (a service); False: it stops the gateway (a terminal's foreground)."""
    env = os.environ if environ is None else environ
    if env.get("NOTIFY_SOCKET"):
        return True
    if (signal.getsignal(signal.SIGHUP) if inherited is None else inherited) == signal.SIG_IGN:
        return True
    return not (has_controlling_terminal() if tty is None else tty)


def sighup_handler(reload: Callable[[], None], stop: Callable[[], None]) -> Callable[[], None]:
    """The SIGHUP handler for this process, chosen now (call before the ops hooks read NOTIFY_SOCKET)."""
    if sighup_reloads():
        return reload

    def hang_up() -> None:
        log.info("SIGHUP: the terminal closed, stopping (a service without a terminal reloads on SIGHUP instead)")
        stop()

    return hang_up
