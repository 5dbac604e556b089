"""The slash commands of the builtin session runtime (/help, /title, /model, /usage, /clear, /stop, /sleep).

A mixin of SessionRuntime: the calls hand the work to the session's slash worker
thread, which answers them in order and within --slash-timeout.
"""

from __future__ import annotations

import time

from protocol.jsonrpc import BAD_VALUE, RpcError
from worker import commands
from worker.channel import Call


class SlashCommands:
    def slash_exec(self, call: Call) -> None:
        command = call.params.get("command")
        if not isinstance(command, str) or not command.strip():
            raise RpcError(BAD_VALUE, "command must be a non-empty string")
        name, arg = commands.parse(command)
        self.slash.submit(call, lambda: self.run_slash(name, arg))

    def command_dispatch(self, call: Call) -> None:
        name = call.params.get("name")
        if not isinstance(name, str) or not name:
            raise RpcError(BAD_VALUE, "name must be a non-empty string")
        arg = str(call.params.get("arg") or "")
        self.slash.submit(call, lambda: self.run_slash(name.lstrip("/").lower(), arg))

    def run_slash(self, name: str, arg: str) -> str:
        """Runs on the slash worker thread."""
        if name == "help":
            return "\n".join(f"{cmd:<8} {desc}" for cmd, desc, _ in commands.COMMANDS)
        if name == "title":
            if arg:
                store = self._store_if_on()
                self.title = store.set_title(self.key, arg) if store else arg[:200]
                self.meta_dirty = True
                self.ch.emit("session.title", {"session_id": self.key, "title": self.title})
            return f"title: {self.title or '(untitled)'}"
        if name == "model":
            if arg:
                self.model = self.agent.model = arg  # the next turn uses it
                if self.store is not None:
                    self.store.set_model(self.key, arg)
                self.meta_dirty = True
            return f"model: {self.model}"
        if name == "usage":
            u = self.usage
            return f"turns {u['turns']} · input {u['input']} · output {u['output']} · total {u['total']}"
        if name == "clear":
            self.history = []
            return "context cleared (history stays stored)"
        if name == "stop":
            self.cancel.set()
            return "interrupted" if self.state != "idle" else "nothing running"
        if name == "sleep":
            seconds = min(float(arg or 1), 3600.0)
            time.sleep(seconds)
            return f"slept {seconds:g}s"
        raise ValueError(f"unknown command: /{name}")
