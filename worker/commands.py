"""The builtin runtime's slash commands: the catalog the lobby serves and the table a session runs."""

from __future__ import annotations

COMMANDS: list[tuple[str, str, str]] = [
    # (command, description, category)
    ("/help", "List the available commands", "Info"),
    ("/title", "Show or set the session title: /title [name]", "Session"),
    ("/model", "Show or switch the model: /model [name]", "Configuration"),
    ("/usage", "Token usage of this session", "Info"),
    ("/clear", "Forget the conversation context (history stays stored)", "Session"),
    ("/stop", "Interrupt the running turn", "Session"),
    ("/sleep", "Diagnostics: hold the slash worker for N seconds", "Diagnostics"),
]


def catalog() -> dict:
    categories: dict[str, list[list[str]]] = {}
    for cmd, desc, cat in COMMANDS:
        categories.setdefault(cat, []).append([cmd, desc])
    return {
        "pairs": [[cmd, desc] for cmd, desc, _ in COMMANDS],
        "sub": {},
        "canon": {cmd: cmd for cmd, _, _ in COMMANDS},
        "categories": [{"name": name, "pairs": pairs} for name, pairs in categories.items()],
        "skill_count": 0,
        "warning": "",
    }


def parse(command: str) -> tuple[str, str]:
    """'/title  My chat' -> ('title', 'My chat')."""
    text = command.strip()
    if text.startswith("/"):
        text = text[1:]
    name, _, arg = text.partition(" ")
    return name.lower(), arg.strip()


def complete(prefix: str) -> list[dict]:
    prefix = prefix.strip()
    return [{"text": cmd, "display": cmd, "meta": desc} for cmd, desc, _ in COMMANDS if cmd.startswith(prefix)]
