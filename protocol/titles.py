"""Process titles: what `ps`, hermes-ps and the start-up sweep read to tell the gateway's processes apart.

One helper for every process of the gateway (the broker, the zygote, each worker), so
the names below are the only spelling of each.
"""

from __future__ import annotations

GATEWAY = "hermes-gateway"
ZYGOTE = "hermes-zygote"
WORKER = "hermes-worker"


def set_title(text: str) -> None:
    """Set this process's title (a no-op where setproctitle is missing: titles are a convenience, not a need)."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(text)


def worker_title(kind: str, sid: str = "", key: str = "") -> str:
    if sid:
        return f"{WORKER}: session={sid} key={key}"
    return f"{WORKER}: {kind}"


def gateway_title(sessions: int) -> str:
    return f"{GATEWAY}: {sessions} sessions"
