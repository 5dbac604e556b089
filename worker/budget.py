"""How long a stopping worker may take for each step, derived from the broker's `stop_timeout`.

The broker's stop ladder asks first, SIGTERMs the worker's group at stop_timeout / 2
and SIGKILLs it at stop_timeout (supervisor/broker/ladder.py). The worker takes a
SIGTERM as "stop now" and keeps finalizing, so the hard limit is the SIGKILL. A stop
waits for the calls thread and then for one runtime's own step (the builtin runtime's
turn, or Hermes' close): at most 20% + 40% of stop_timeout, leaving the rest for the
process to exit and the broker to see it. With the default 5 s these are the fixed
waits the worker used before (1 s, 1 s, 2 s).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class StopBudget:
    calls: float  # for the calls thread to finish the handler it runs (one waiting on the store is abandoned)
    turn: float  # for a turn in flight to commit its partial reply as interrupted
    finalize: float  # for the runtime's own close (Hermes: flush history and memory, stop its slash worker)


def stop_budget(config: dict) -> StopBudget:
    try:
        total = float(config.get("stop_timeout", DEFAULT_STOP_TIMEOUT))
    except (TypeError, ValueError):
        total = DEFAULT_STOP_TIMEOUT
    total = max(total, 0.0)
    return StopBudget(calls=min(1.0, 0.2 * total), turn=min(1.0, 0.2 * total), finalize=min(2.0, 0.4 * total))
