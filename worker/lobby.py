"""The lobby runtime: session-less (global) methods, so the broker never imports agent code."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from protocol.jsonrpc import BAD_VALUE, STORE_UNAVAILABLE, RpcError
from worker import commands
from worker.channel import Call, dispatch
from worker.store import QUICK_CHECK_BUDGET_S, Store, StoreError

_CONFIG_MTIME = time.time()


class LobbyRuntime:
    """worker.runtime.Runtime for the lobby: no session, no turns, never busy."""

    state = "idle"
    meta_dirty = False
    sid: str | None = None
    key: str | None = None
    dispatches_off_main = False
    caps: frozenset[str] = frozenset()

    def __init__(self, config: dict, store: Store | None, store_error: str | None) -> None:
        self.config = config
        self.store, self.store_error = _checked(store, store_error)
        self.on_state: Callable[[], None] = lambda: None
        self.handlers: dict[str, Callable[[Call], None]] = {
            "commands.catalog": lambda c: c.reply(commands.catalog()),
            "setup.status": self.setup_status,
            "session.list": self.session_list,
            "session.most_recent": self.most_recent,
            "config.get": self.config_get,
            "config.set": self.config_set,
            "model.options": self.model_options,
            "complete.slash": lambda c: c.reply({"items": commands.complete(str(c.params.get("text", "")))}),
            "complete.path": self.complete_path,
            "command.resolve": self.command_resolve,
            # the TUI polls this every ~2.5 s and prints any error it gets: answer "no pet"
            "pet.cells": lambda c: c.reply({"enabled": False}),
        }

    def handle(self, call: Call) -> None:
        dispatch(self.handlers, call)

    def meta(self) -> dict:
        # persistence off (--persist false) is not a broken store: sessions still start, in memory only
        return {"store_error": (self.store_error or "") if self.config.get("store_path") else ""}

    def finalize(self, reason: str) -> None:
        pass

    def tick(self) -> None:
        pass

    def record_end(self, key: str, reason: str, at: float) -> None:
        """The broker saw a session's worker die without finalizing (killed, crashed): record why.

        The dead worker could not write its own row, so the lobby does; a row already ended, or
        re-opened by a resume after `at`, is left alone."""
        if self.store is None:
            return
        try:
            self.store.end_if_open(key, reason, at)
        except StoreError as exc:
            print(f"lobby: could not record the end of {key} ({reason}): {exc}", flush=True)

    def _store(self) -> Store:
        if self.store is None:
            raise RpcError(STORE_UNAVAILABLE, f"session store unavailable: {self.store_error}")
        return self.store

    def setup_status(self, call: Call) -> None:
        agent = self.config.get("agent", "echo")
        configured = agent == "echo" or bool(self.config.get("openai_base_url") and self.config.get("openai_model"))
        store = {"ok": self.store is not None, "path": self.config.get("store_path", ""),
                 "error": self.store_error or ""}
        call.reply({"provider_configured": configured, "agent": agent, "store": store})

    def session_list(self, call: Call) -> None:
        limit = call.params.get("limit", 20)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise RpcError(BAD_VALUE, "limit must be an integer from 1 to 1000")
        call.reply({"sessions": [s.row() for s in self._store().list(limit)]})

    def most_recent(self, call: Call) -> None:
        rows = self._store().list(1)
        if not rows:
            call.reply({"session_id": None, "session": None})
            return
        row = rows[0].row()
        # upstream's shape ({session_id, title, started_at, source}) plus the full list row
        call.reply({"session_id": row["session_key"], "title": row["title"], "started_at": row["started_at"],
                    "source": row["source"], "session": row})

    def config_get(self, call: Call) -> None:
        key = call.params.get("key", "full")
        full = {"model": {"default": self.config.get("openai_model") or "echo",
                          "provider": self.config.get("agent", "echo")},
                "display": {}, "agent": {"name": self.config.get("agent", "echo")}}
        if key == "full":
            call.reply({"config": full})
        elif key == "mtime":
            call.reply({"mtime": _CONFIG_MTIME})
        elif key == "model":
            call.reply({"value": full["model"]["default"]})
        else:
            call.reply({"value": None})

    def config_set(self, call: Call) -> None:
        raise RpcError(BAD_VALUE, "global configuration is read-only through the gateway; edit the config file")

    def model_options(self, call: Call) -> None:
        model = self.config.get("openai_model") or "echo"
        call.reply({"models": [model], "current": model, "providers": [self.config.get("agent", "echo")]})

    def complete_path(self, call: Call) -> None:
        word = str(call.params.get("word") or call.params.get("text") or "")
        base = os.path.expanduser(word)
        folder, prefix = os.path.split(base)
        try:
            names = sorted(os.listdir(folder or "."))[:500]
        except OSError:
            names = []
        items = []
        for name in names:
            if name.startswith(prefix) and (prefix.startswith(".") or not name.startswith(".")):
                full = os.path.join(folder, name)
                items.append({"text": full + ("/" if os.path.isdir(full) else ""), "display": name})
        call.reply({"items": items[:100]})

    def command_resolve(self, call: Call) -> None:
        name, _ = commands.parse(str(call.params.get("name") or call.params.get("command") or ""))
        known = {cmd.lstrip("/") for cmd, _, _ in commands.COMMANDS}
        call.reply({"canonical": f"/{name}" if name in known else None, "known": name in known})


def _checked(store: Store | None, error: str | None) -> tuple[Store | None, str | None]:
    """The start check (PRAGMA quick_check, bounded): a damaged store is refused, closed, and never written.

    The lobby runs it once per gateway start; its hello carries the error, and the broker then
    refuses creates and resumes, so no worker writes into the damaged file.
    """
    if store is None:
        return None, error
    try:
        if not store.quick_check():
            print(f"lobby: the store check did not finish within {QUICK_CHECK_BUDGET_S:g} s; not checked",
                  flush=True)
        return store, None
    except StoreError as exc:
        print(f"worker: session store unusable: {exc}", file=sys.stderr, flush=True)
        store.close()
        return None, str(exc)
