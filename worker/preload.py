"""What the fork server must load before it forks, per runtime and agent.

The broker asks this module and passes the answer to the zygote; it knows no agent
and no runtime itself.
"""

from __future__ import annotations


def plan(config: dict) -> tuple[list[str], dict[str, str]]:
    """(modules the zygote imports before forking, environment it starts with)."""
    if config.get("runtime") == "hermes":
        from worker.hermes_home import prepare  # file work only: Hermes reads HERMES_HOME at import

        return ["worker.hermes_runtime"], prepare(config)
    agent = "worker.agents.openai" if config.get("agent") == "openai" else "worker.agents.echo"
    return ["worker.session", "worker.lobby", agent], {}  # the agent too: an import after the fork costs ~2 ms
