"""What operations may see of the running gateway, and the few things they may ask of it.

Control, metrics, the monitor and the sd_notify/title wiring get this narrow
interface instead of the daemon: a read-only snapshot, the cheap counts, and three
actions (accept or drain, kill a worker, register a hook). So `accepting` has one
writer (the broker's set_accepting), and nothing here can reach into a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from supervisor.config import Config


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The gateway at one moment, as plain data (rows carry no process figures: the sampler adds those)."""

    gateway: dict[str, Any]  # pid, version, started_at, uptime, accepting, closing, counts, reaps, config, …
    workers: list[dict[str, Any]]  # one row per worker: supervisor/broker/views.worker_row
    rpc_counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (method, outcome) -> calls
    rejected: dict[str, int] = field(default_factory=dict)  # refused connections by reason


class Supervised(Protocol):
    cfg: Config  # read it; SIGHUP applies changes
    started_at: float  # wall clock
    token: str
    runtime_root: str  # the runtime dir (control socket, token file)

    def snapshot(self) -> Snapshot: ...

    def counts(self) -> dict[str, int]:
        """sessions, attached, detached, spares, workers, clients: cheap, for every change."""

    def accepting(self) -> bool: ...

    def set_accepting(self, accepting: bool) -> bool:
        """Drain (False) or accept again (True); False when the gateway is shutting down."""

    def targets(self) -> list[tuple[int, float]]:
        """(pid, create time) of every live worker: what the sampler reads."""

    def kill(self, target: Any, reason: str) -> Awaitable[dict[str, Any] | None]:
        """Stop the worker of a session id, stored key or pid through its stop ladder; None if no such worker."""

    def restart(self) -> Awaitable[dict[str, Any]]:
        """Hand over to a successor; RuntimeError (HandoverError) with its reason when it could not start."""

    def on_change(self, fn: Callable[[], None]) -> None:
        """Call fn after a change to the tables (coalesced by the caller)."""

    def on_worker_stopped(self, fn: Callable[[str, float], None]) -> None:
        """Call fn(reason, ladder seconds) after each stop."""

    def add_route(self, path: str, handler: Callable[..., Any]) -> None:
        """Serve an HTTP path on the gateway's port (GET /metrics)."""
