"""Agents behind one small interface; `make_agent` picks one by name."""

from __future__ import annotations

from worker.agents.base import Agent, AgentEvent, TurnResult


def make_agent(name: str, config: dict) -> Agent:
    if name == "echo":
        from worker.agents.echo import EchoAgent

        return EchoAgent(delay=float(config.get("echo_delay", 0.0)))
    if name == "openai":
        from worker.agents.openai import OpenAIAgent

        return OpenAIAgent.from_config(config)
    raise ValueError(f"unknown agent {name!r} (known: echo, openai)")


__all__ = ["Agent", "AgentEvent", "TurnResult", "make_agent"]
