"""The builtin session runtime: one session, its history, agent turns, slash worker and poller.

A spare worker runs this unbound; `session.create` or `session.resume` binds it to
one session for the rest of its life. Calls are handled one at a time on the worker's
`calls` thread (worker/calls.py; interrupts inline on the main thread) and must return
quickly: turns, slash commands and background tasks run on their own threads and
answer or emit from there.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
import traceback
from typing import Callable

from protocol import __version__, ids
from protocol.jsonrpc import (
    BAD_VALUE, SESSION_BUSY, SESSION_NOT_FOUND, STORE_UNAVAILABLE,
    STORED_SESSION_NOT_FOUND, RpcError,
)
from worker import commands
from worker.agents import Agent, TurnResult, make_agent
from worker.background import DEFAULT_QUEUE, DEFAULT_WORKERS, BackgroundPool
from worker.budget import stop_budget
from worker.channel import Call, Channel, dispatch
from worker.poller import Completion, NotificationPoller
from worker.session_slash import SlashCommands
from worker.slash import SlashWorker
from worker.store import Store, StoreError

PARTIAL_COMMIT_INTERVAL = 1.0  # s: a killed worker loses at most this much of a streaming reply


class SessionRuntime(SlashCommands):
    """worker.runtime.Runtime for one builtin session."""

    dispatches_off_main = False  # main.py runs handle() on its calls thread
    caps: frozenset[str] = frozenset()  # answers the methods of protocol.methods only

    def __init__(self, channel: Channel, config: dict, store: Store | None, store_error: str | None) -> None:
        self.ch = channel
        self.config = config
        self.store = store
        self.store_error = store_error
        self.agent: Agent = make_agent(config.get("agent", "echo"), config)
        self.model = self.agent.model
        self.sid: str | None = None
        self.key: str | None = None
        self.title = ""
        self.started_at = 0.0
        self.cols = 80
        self.history: list[dict] = []  # what the agent sees (cleared by /clear)
        self.transcript: list[dict] = []  # every message, with store ids (display + undo)
        self.usage = {"input": 0, "output": 0, "total": 0, "turns": 0}
        self.state = "idle"
        self.meta_dirty = True
        self.on_state: Callable[[], None] = lambda: None
        self.cancel = threading.Event()
        self._reply: list[str] = []  # the streaming reply so far, in pieces: appending stays linear
        self._turns: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._busy = threading.Lock()  # held for the whole of a turn
        self._turn_thread = threading.Thread(target=self._turn_loop, name="turns", daemon=True)
        self._turn_thread.start()
        self.slash = SlashWorker(timeout=float(config.get("slash_timeout", 30.0)))
        self.budget = stop_budget(config)
        self.poller = NotificationPoller(self.ch.emit)
        self.background_pool = BackgroundPool(int(config.get("background_workers", DEFAULT_WORKERS)),
                                              int(config.get("background_queue", DEFAULT_QUEUE)))
        self.handlers: dict[str, Callable[[Call], None]] = {
            "session.create": self.create,
            "session.resume": self.resume,
            "session.activate": self.activate,
            "prompt.submit": self.submit,
            "prompt.background": self.background,
            "session.interrupt": self.interrupt,
            "session.steer": self.steer,
            "session.history": lambda c: c.reply({"count": len(self.transcript), "messages": self.display()}),
            "session.title": self.title_call,
            "session.usage": lambda c: c.reply(dict(self.usage)),
            "session.undo": self.undo,
            "session.compress": self.compress,
            "session.info": lambda c: c.reply(self.info()),
            "slash.exec": self.slash_exec,
            "command.dispatch": self.command_dispatch,
            "terminal.resize": self.resize,
            "approval.respond": self.nothing_pending,
            "clarify.respond": self.nothing_pending,
            "sudo.respond": self.nothing_pending,
            "secret.respond": self.nothing_pending,
            "input.detect_drop": lambda c: c.reply({"matched": False}),
            "config.set": self.config_set,
            "config.get": self.config_get,
            "complete.slash": lambda c: c.reply({"items": commands.complete(str(c.params.get("text", "")))}),
        }

    @property
    def partial(self) -> str:
        """The streaming reply so far (a re-attaching client's snapshot): joined only when asked."""
        return "".join(self._reply)

    # -- dispatch -------------------------------------------------------------
    def handle(self, call: Call) -> None:
        if self.sid is None and call.method not in ("session.create", "session.resume") and call.method in self.handlers:
            call.fail(SESSION_NOT_FOUND, "session not found")
            return
        dispatch(self.handlers, call)

    def _need_store(self) -> Store:
        if self.store is None:
            raise RpcError(STORE_UNAVAILABLE, f"session store unavailable: {self.store_error}")
        return self.store

    def _store_if_on(self) -> Store | None:
        """None when persistence is off (--persist false): the session then lives in memory only."""
        return self._need_store() if self.config.get("store_path") else None

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.meta_dirty = True
            self.on_state()

    # -- snapshot shapes ------------------------------------------------------
    def info(self) -> dict:
        return {
            "model": self.model,
            "provider": self.agent.name,
            "tools": {},
            "skills": {},
            "cwd": os.getcwd(),
            "title": self.title,
            "stored_session_id": self.key or "",
            "running": self.state != "idle",
            "usage": dict(self.usage),
            "runtime": "builtin",
            "agent": self.agent.name,
            "pid": os.getpid(),
            "version": __version__,
        }

    def meta(self) -> dict:
        preview = next((m["text"][:80] for m in self.transcript if m["role"] == "user"), "")
        return {"sid": self.sid or "", "key": self.key or "", "title": self.title, "model": self.model,
                "message_count": len(self.transcript), "preview": preview, "started_at": self.started_at}

    def display(self) -> list[dict]:
        out = []
        for m in self.transcript:
            msg = {"role": m["role"], "text": m["text"]}
            if m.get("status") and m["role"] == "assistant" and m["status"] != "complete":
                msg["status"] = m["status"]
            out.append(msg)
        return out

    def snapshot(self, resumed: str | None = None) -> dict:
        """The live-session shape of resume/activate (upstream's fields, so the TUI restores its view)."""
        busy = self.state != "idle"
        return {"session_id": self.sid, "resumed": resumed or self.key, "session_key": self.key,
                "message_count": len(self.transcript), "messages": self.display(), "info": self.info(),
                "running": busy, "status": self.state, "started_at": self.started_at,
                "inflight": {"assistant": self.partial, "streaming": True} if busy else None}

    def _bind(self) -> dict:
        self.ch.sid = self.sid or ""
        self.meta_dirty = True
        return {"sid": self.sid, "key": self.key, **self.meta()}

    # -- lifecycle calls ------------------------------------------------------
    def create(self, call: Call) -> None:
        store = self._store_if_on()
        if self.sid is not None:
            raise RpcError(BAD_VALUE, "this worker already hosts a session")
        self.cols = _cols(call.params)
        self.sid, self.key, self.started_at = ids.runtime_id(), ids.stored_key(), time.time()
        if store is not None:
            store.create_session(self.key, model=self.model, source=str(call.params.get("source") or "tui"))
        call.reply({"session_id": self.sid, "stored_session_id": self.key, "message_count": 0, "messages": [],
                    "info": self.info()}, bind=self._bind())
        self.ch.emit("session.info", self.info())

    def resume(self, call: Call) -> None:
        target = str(call.params.get("session_id") or "").strip()
        if self.sid is not None:  # the broker found this session live: re-attach snapshot
            call.reply(self.snapshot(), bind=self._bind())
            return
        if not target:
            raise RpcError(4006, "session_id required")
        cols = _cols(call.params)
        store = self._need_store()
        found = store.find(target)
        if found is None:
            raise RpcError(STORED_SESSION_NOT_FOUND, f"stored session not found: {target}")
        self.key, self.title = found.key, found.title or ""
        self.model = self.agent.model = found.model or self.model
        self.started_at = found.created_at
        for m in store.messages(found.key):
            if m["role"] == "assistant" and m["status"] == "streaming":
                m["status"] = "interrupted"  # its worker died mid-turn
                store.update_message(m["id"], m["text"], "interrupted")
            self.transcript.append(m)
        self.history = [{"role": m["role"], "content": m["text"]} for m in self.transcript]
        store.reopen(found.key)
        self.sid = ids.runtime_id()
        self.cols = cols
        call.reply(self.snapshot(resumed=found.key), bind=self._bind())
        self.ch.emit("session.info", self.info())

    def activate(self, call: Call) -> None:
        call.reply(self.snapshot())

    def finalize(self, reason: str) -> None:
        """Flush and record why the session ended; the process exits right after."""
        self.cancel.set()
        if self.store is not None and self.key is not None:
            try:
                self.store.end(self.key, reason)
            except StoreError as exc:
                print(f"worker: could not record end of {self.key}: {exc}", flush=True)
        self.slash.stop()
        self.background_pool.stop()
        self.poller.stop()
        self._turns.put(None)
        # a turn in flight commits its partial text as interrupted before the process goes
        if self._busy.acquire(timeout=self.budget.turn):
            self._busy.release()

    def tick(self) -> None:
        self.slash.check_deadline()

    def record_end(self, key: str, reason: str, at: float) -> None:
        pass  # the lobby's job

    # -- turns ----------------------------------------------------------------
    def submit(self, call: Call) -> None:
        text = call.params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RpcError(BAD_VALUE, "text must be a non-empty string")
        if self.state != "idle":
            raise RpcError(SESSION_BUSY, "session busy: a turn is running (interrupt it or wait)")
        store = self._store_if_on()
        msg_id = store.add_message(self.key, "user", text) if store else None  # committed before we answer
        self.transcript.append({"id": msg_id, "role": "user", "text": text, "status": None})
        self.history.append({"role": "user", "content": text})
        self.cancel.clear()
        self.set_state("working")
        self._turns.put(text)
        call.reply({"status": "streaming"})

    def _turn_loop(self) -> None:
        while True:
            text = self._turns.get()
            if text is None:
                return
            with self._busy:
                try:
                    self._turn(text)  # reports idle itself, just before message.complete
                except Exception:
                    # never here in practice (_turn catches the agent's errors); if it is, do not stay "working"
                    traceback.print_exc()
                    self.set_state("idle")

    def _turn(self, text: str) -> None:
        self.ch.emit("message.start", {})
        parts: list[str] = []
        self._reply = parts
        msg_id: int | None = None
        unstored: str | None = None  # why the last commit failed, if it did
        last_commit = time.monotonic()
        result = TurnResult()
        gen = self.agent.run_turn(text, self.history[:-1], self.cancel)
        try:
            while True:
                ev = next(gen)
                if ev.type == "message.delta":
                    parts.append(ev.payload.get("text", ""))
                self.ch.emit(ev.type, ev.payload)
                if time.monotonic() - last_commit >= PARTIAL_COMMIT_INTERVAL:
                    msg_id, unstored = self._commit_reply(msg_id, "".join(parts), "streaming")
                    last_commit = time.monotonic()
        except StopIteration as stop:
            result = stop.value or TurnResult()
        except Exception as exc:
            result = TurnResult(status="error", error=f"{type(exc).__name__}: {exc}")
        if result.status == "error":
            self.ch.emit("error", {"message": result.error or "the agent failed"})
        reply = "".join(parts)
        self._reply = []
        msg_id, unstored = self._commit_reply(msg_id, reply, result.status)
        if unstored is not None:
            # write-ahead rule 3: a reply is complete only once stored; the client hears it was not
            print(f"worker: the reply of {self.key} was not stored: {unstored}", flush=True)
            result = TurnResult(status="error", error=f"the reply could not be stored: {unstored}",
                                usage=result.usage)
        self.transcript.append({"id": msg_id, "role": "assistant", "text": reply, "status": result.status})
        self.history.append({"role": "assistant", "content": reply})
        for k in ("input", "output", "total"):
            self.usage[k] += int(result.usage.get(k, 0) or 0)
        self.usage["turns"] += 1
        self.meta_dirty = True
        self.set_state("idle")  # before complete: a client may submit its next prompt as soon as it sees it
        done = {"text": reply, "usage": result.usage, "status": result.status}
        if unstored is not None:
            done["error"] = result.error
        self.ch.emit("message.complete", done)

    def _commit_reply(self, msg_id: int | None, text: str, status: str) -> tuple[int | None, str | None]:
        """(the row id, None) once stored; (the id so far, why) when the store refused it. Logs nothing:
        a failing partial commit is retried each interval, and the turn's end reports the outcome once."""
        if self.store is None:
            return msg_id, None
        try:
            if msg_id is None:
                return self.store.add_message(self.key, "assistant", text, status), None
            self.store.update_message(msg_id, text, status)
        except StoreError as exc:
            return msg_id, str(exc)
        return msg_id, None

    def interrupt(self, call: Call) -> None:
        self.cancel.set()
        call.reply({"status": "interrupted"})

    def steer(self, call: Call) -> None:
        if self.state == "idle":
            raise RpcError(SESSION_BUSY, "nothing to steer: no turn is running")
        call.reply({"status": "queued", "text": str(call.params.get("text", ""))})

    def nothing_pending(self, call: Call) -> None:
        raise RpcError(SESSION_BUSY, "nothing pending")

    def background(self, call: Call) -> None:
        text = call.params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RpcError(BAD_VALUE, "text must be a non-empty string")
        task_id = f"bg_{secrets.token_hex(4)}"

        def run() -> None:
            cancel, parts = threading.Event(), []
            gen = self.agent.run_turn(text, list(self.history), cancel)
            status = "complete"
            try:
                for ev in gen:
                    if ev.type == "message.delta":
                        parts.append(ev.payload.get("text", ""))
            except Exception as exc:
                status, parts = "error", [str(exc)]
            self.poller.completions.put(Completion(task_id, "".join(parts), status))

        self.background_pool.submit(run)  # full: a 4290 error naming the limit, nothing started
        call.reply({"task_id": task_id})

    # -- small calls ----------------------------------------------------------
    def title_call(self, call: Call) -> None:
        title = call.params.get("title")
        if title is not None:
            if not isinstance(title, str) or not title.strip():
                raise RpcError(BAD_VALUE, "title must be a non-empty string")
            store = self._store_if_on()
            self.title = store.set_title(self.key, title) if store else title.strip()[:200]
            self.meta_dirty = True
            self.ch.emit("session.title", {"session_id": self.key, "title": self.title})
        call.reply({"title": self.title, "session_key": self.key})

    def undo(self, call: Call) -> None:
        if self.state != "idle":
            raise RpcError(SESSION_BUSY, "session busy")
        last_user = max((i for i, m in enumerate(self.transcript) if m["role"] == "user"), default=None)
        if last_user is None:
            call.reply({"removed": 0})
            return
        removed = self.transcript[last_user:]
        del self.transcript[last_user:]
        self.history = [{"role": m["role"], "content": m["text"]} for m in self.transcript]
        if self.store is not None:
            self.store.delete_messages([m["id"] for m in removed if m.get("id")], self.key)
        self.meta_dirty = True
        call.reply({"removed": len(removed)})

    def compress(self, call: Call) -> None:
        call.reply({"status": "compressed", "message_count": len(self.history)})

    def resize(self, call: Call) -> None:
        cols = call.params.get("cols")
        if not isinstance(cols, int) or isinstance(cols, bool) or not 1 <= cols <= 10_000:
            raise RpcError(BAD_VALUE, "cols must be an integer from 1 to 10000")
        self.cols = cols
        call.reply({"cols": cols})

    def config_set(self, call: Call) -> None:
        key, value = call.params.get("key"), call.params.get("value")
        if key == "model" and isinstance(value, str) and value:
            self.model = self.agent.model = value  # the next turn uses it
            if self.store is not None:
                self.store.set_model(self.key, value)
            self.meta_dirty = True
            call.reply({"key": key, "value": value})
            return
        raise RpcError(BAD_VALUE, f"config key not settable per session: {key!r}")

    def config_get(self, call: Call) -> None:
        key = call.params.get("key")
        if key == "model":
            call.reply({"value": self.model})
            return
        raise RpcError(BAD_VALUE, f"unknown config key: {key!r}")


def _cols(params: dict) -> int:
    """`cols` of create/resume, read leniently as upstream's resume does: a value that is not a sane width is 80."""
    try:
        cols = int(params.get("cols") or 80)
    except (TypeError, ValueError, OverflowError):
        return 80
    return cols if 1 <= cols <= 10_000 else 80
