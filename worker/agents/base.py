"""The agent interface: a turn is a stream of events; interrupt is a threading.Event the agent honours."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol


@dataclass(slots=True)
class AgentEvent:
    """One thing the agent did: `type` is a client event name (message.delta, tool.start, …)."""

    type: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class TurnResult:
    status: str = "complete"  # complete | interrupted | error
    usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Agent(Protocol):
    name: str
    model: str

    def run_turn(self, text: str, history: list[dict], cancel: threading.Event) -> Iterator[AgentEvent]:
        """Yield events; return a TurnResult (via StopIteration.value). Must stop soon after `cancel` is set."""
        ...
