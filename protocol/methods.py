"""The method table: who answers what (gateway, session worker, lobby worker)."""

from __future__ import annotations

from enum import Enum


class Scope(Enum):
    GATEWAY = "gateway"  # answered by the broker itself
    SESSION = "session"  # routed by params.session_id to the owning worker
    GLOBAL = "global"    # served by the lobby worker


GATEWAY_METHODS = frozenset({
    "gateway.ping",
    "client.capabilities",
    "session.create",
    "session.resume",
    "session.activate",
    "session.close",
    "session.active_list",
    "session.events.since",
})

# Methods that take a session_id but may also run without one (then: lobby).
DUAL_METHODS = frozenset({"config.set", "config.get", "complete.slash", "complete.path", "command.resolve"})

SESSION_METHODS = frozenset({
    "prompt.submit",
    "prompt.background",
    "session.interrupt",
    "session.steer",
    "session.history",
    "session.title",
    "session.usage",
    "session.undo",
    "session.compress",
    "session.info",
    "slash.exec",
    "command.dispatch",
    "terminal.resize",
    "approval.respond",
    "clarify.respond",
    "sudo.respond",
    "secret.respond",
    "input.detect_drop",
})

# Calls that make the caller an attached viewer of the session (design rule 1).
ATTACHING_METHODS = frozenset({"session.create", "session.resume", "session.activate", "prompt.submit"})


def scope_of(method: str, params: dict) -> Scope:
    if method in GATEWAY_METHODS:
        return Scope.GATEWAY
    if method in SESSION_METHODS:
        return Scope.SESSION
    if method in DUAL_METHODS and params.get("session_id"):
        return Scope.SESSION
    return Scope.GLOBAL
