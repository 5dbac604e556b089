"""What the fork server must load before it forks, per runtime and agent.

The broker asks this module and passes the answer to the zygote; it knows no agent
and no runtime itself.
"""

from __future__ import annotations

import os

from protocol.marker import MARKER_ENV, worker_tag
from worker.hermes import slash_fork


def plan(config: dict) -> tuple[list[str], dict[str, str]]:
    """(modules the zygote imports before forking, environment it starts with).

    The environment always carries this gateway's marker (protocol/marker.py): the start-up
    sweep kills a journaled process only if it has it."""
    # SPT_NOENV: setproctitle would otherwise reuse the environment's memory for the title, and the
    # marker would vanish from /proc/PID/environ (titles then fit in the zygote's argv, ~100 bytes)
    marker = {MARKER_ENV: worker_tag(str(config.get("data_dir") or "")), "SPT_NOENV": "1"}
    if config.get("runtime") == "hermes":
        from worker.hermes.home import prepare  # file work only: Hermes reads HERMES_HOME at import

        # two malloc arenas, not one per thread: a session worker runs ~10 threads and each would dirty its own
        # arena's pages (bench/hermes_worker.py: worker USS 36.2 -> 34.0 MiB); a value the user set is kept
        arenas = {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
        # where the fork server listens for its workers' slash-worker requests (worker/hermes/slash_fork.py)
        slash = {slash_fork.SOCKET_DIR_ENV: config["runtime_dir"]} if config.get("runtime_dir") else {}
        return ["worker.hermes.runtime"], {**prepare(config), **arenas, **slash, **marker}
    agent = "worker.agents.openai" if config.get("agent") == "openai" else "worker.agents.echo"
    return ["worker.session", "worker.lobby", agent], marker  # the agent too: an import after the fork costs ~2 ms
