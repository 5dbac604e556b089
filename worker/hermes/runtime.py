"""The `hermes` runtime: the real Hermes session code (`tui_gateway.server.dispatch`) hosted in a worker.

One worker process holds one Hermes session (or, as the lobby, none), so Hermes'
module-global `_sessions` never holds more than one entry and everything the
session owns — the AIAgent, its slash-worker subprocess, its notification poller,
the threads and sockets of its tools — is reclaimed by ending the process.

Calls are handed to `dispatch()` on a dispatcher thread (Hermes' inline handlers may
block, and the worker's main thread must keep the link and its heartbeats going).
Every frame Hermes writes comes back through `_Transport.write()`: responses are
matched to their call by a worker-local id, events are numbered (`seq`) and sent on.
The session's runtime id and stored key are learnt from the `session.create` /
`session.resume` response and sent to the broker as `bind`.

Importing this module imports the heavy Hermes modules with their thread starts held
back, runs Hermes' environment probe and fills its caches (worker/hermes/preload.py),
so the fork server pays for them once; worker/hermes/process.py adapts Hermes'
process-level behaviour to a process that is one session.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from typing import Any, Callable

from protocol.jsonrpc import BAD_VALUE, INTERNAL_ERROR
from protocol.lifecycle import HOSTS_SESSION_METHODS
from protocol.titles import set_title, worker_title
from worker.budget import stop_budget
from worker.calls import INLINE
from worker.channel import Call, Channel
from worker.hermes.preload import server, start_held_threads
from worker.hermes.process import (
    GroupedSubprocess, LazySlashWorker, become_subreaper, kill_descendants, no_update_check,
)
from worker.hermes import git, probe, ssl_stock, tls_context
from worker.hermes.rehearsal import REHEARSAL_DELAY, rehearse
from worker.hermes.warmup import warm_create
from worker.redact import Redactor

tls_context.install()  # in the fork server: every request's client shares one loaded CA bundle

# A bound worker hosts exactly one session: methods that would open a second one here are refused.
_ONE_SESSION_ONLY = frozenset({"session.branch"})
# a session created with any of these may resolve another model or endpoint than the rehearsal's build did
_OWN_RUNTIME = ("model_override", "profile_home", "resume_runtime_overrides", "resume_session_id")
_STATES = {"working": "working", "waiting": "waiting"}  # Hermes' live status -> the broker's; else idle
STATE_CHECK = 0.5  # s between reconciliations of the state with Hermes' flags


class _Transport:
    """What Hermes writes to: thread-safe, never 'closed' (the broker owns the client connections)."""

    _closed = False

    def __init__(self, runtime: "HermesRuntime") -> None:
        self.runtime = runtime

    def write(self, obj: dict) -> bool:
        try:
            if obj.get("method") == "event":
                self.runtime.on_event(obj.get("params") or {})
            else:
                self.runtime.on_response(obj)
        except Exception as exc:  # a frame we cannot pass on must not break Hermes' thread
            print(f"hermes-runtime: dropped a frame: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return True

    def close(self) -> None:
        pass


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str)


class HermesRuntime:
    """worker.runtime.Runtime hosting Hermes' own dispatch (a session, or the lobby's global methods)."""

    dispatches_off_main = True  # handle() only queues: Hermes runs the call on its dispatcher thread
    caps = frozenset({HOSTS_SESSION_METHODS})  # Hermes answers every method of its session, not only ours

    def __init__(self, channel: Channel, config: dict) -> None:
        self.ch = channel
        self.config = config
        self.lobby = config.get("kind") == "lobby"
        self.sid: str | None = None
        self.key: str | None = None
        self.title = ""
        self.model = ""
        self.started_at = 0.0
        self.state = "idle"
        self.meta_dirty = True
        self.on_state: Callable[[], None] = lambda: None
        self.store_error = ""
        self.redact = Redactor.from_config(config)  # the API key never goes out (worker/redact.py)
        self._lock = threading.RLock()  # calls table, bind, and event order around the bind
        self._calls: dict[int, tuple[Call, str]] = {}
        self._early: list[dict] = []  # events written before the bind response went out
        self._next = 0
        self._closing = False
        self._next_check = 0.0  # when tick() next reconciles the state with Hermes' flags
        self._queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._dispatcher: int | None = None  # the dispatcher thread's ident
        self._builds: list[str] = []  # agent builds Hermes asked for during the call in progress
        self.transport = _Transport(self)
        start_held_threads()
        no_update_check()
        become_subreaper()
        server.subprocess = GroupedSubprocess()  # type: ignore[attr-defined]
        server._SlashWorker = LazySlashWorker  # type: ignore[attr-defined]
        server._stdio_transport = self.transport  # frames with no session transport come to us, not stdout
        git.install(server)  # no git started for the branch of a cwd outside any repository
        self._schedule_later = server._schedule_agent_build
        server._schedule_agent_build = self._schedule_build  # type: ignore[attr-defined]
        if self.lobby:
            self._check_store()
        threading.Thread(target=self._dispatch_loop, name="hermes-dispatch", daemon=True).start()

    def _check_store(self) -> None:
        """Hermes' session database (HERMES_HOME/state.db) must open, or the broker refuses new sessions."""
        try:
            if server._get_db() is None:
                self.store_error = str(getattr(server, "_db_error", "") or "state.db unavailable")
        except Exception as exc:
            self.store_error = f"{type(exc).__name__}: {exc}"

    # -- calls ----------------------------------------------------------------
    def handle(self, call: Call) -> None:
        """Main thread: queue the call; Hermes answers through the transport."""
        if self.sid is not None and call.method in _ONE_SESSION_ONLY:
            call.fail(BAD_VALUE, f"{call.method} is not supported by the gateway yet (one session per worker)")
            return
        if call.method in INLINE:  # unblocks or stops a turn: never behind a slow call on the dispatcher
            threading.Thread(target=self._dispatch, args=(call,), name="hermes-fast", daemon=True).start()
        else:
            self._queue.put(call)

    def _schedule_build(self, sid: str, delay: float = 0.05) -> None:
        """Hermes builds a new session's agent on a timer 50 ms after session.create / resume, to let its
        response reach the client first. Here the response goes out when dispatch() returns, so the build
        starts right after it (`_start_builds`) instead of 50 ms later; a call from elsewhere keeps the timer."""
        if threading.get_ident() == self._dispatcher:
            self._builds.append(sid)
        else:
            self._schedule_later(sid, delay)

    def _start_builds(self) -> None:
        builds, self._builds = self._builds, []
        self._await_sent()
        for sid in builds:
            session = server._sessions.get(sid)
            if session is not None:
                if not any(session.get(k) for k in _OWN_RUNTIME):  # its build probes what the rehearsal's did
                    probe.start()
                try:
                    server._start_agent_build(sid, session)  # starts Hermes' build thread and returns
                except Exception as exc:
                    print(f"hermes-runtime: starting the agent build failed: {type(exc).__name__}: {exc}",
                          file=sys.stderr, flush=True)

    def _await_sent(self, limit: float = 0.05) -> None:
        """Until the main thread has taken the response from the link's outbox (at most Hermes' 50 ms): a build
        started earlier holds the GIL while the main thread waits for it to send the response (+5 ms measured)."""
        deadline = time.monotonic() + limit
        while not self.ch.link.drained() and time.monotonic() < deadline:
            time.sleep(0.0005)

    def _dispatch_loop(self) -> None:
        self._dispatcher = threading.get_ident()
        call: Call | None = None
        if self.config.get("kind", "spare") == "spare":
            # A spare is forked when the one before it was handed a session, so rehearsing at once would take
            # a core from that session's agent build and first turn; it waits REHEARSAL_DELAY first. A call in
            # that time is served at once, unrehearsed (faster than rehearsing first); one that comes during
            # the rehearsal waits for the rest of it.
            try:
                call = self._queue.get(timeout=REHEARSAL_DELAY)
            except queue.Empty:
                took = rehearse()
                if took:
                    print(f"hermes-runtime: spare rehearsed an agent build in {took * 1000:.0f} ms",
                          file=sys.stderr, flush=True)
                # the client's session.create then runs warm (worker/hermes/warmup.py); not when one already
                # waits: the warm-up would only delay it
                took = warm_create() if self._queue.empty() else 0.0
                self._builds.clear()  # the throwaway session's build: it was taken back, nothing to build
                if took:
                    print(f"hermes-runtime: spare ran a throwaway session.create in {took * 1000:.1f} ms",
                          file=sys.stderr, flush=True)
            else:
                if call is None:
                    return
                self._dispatch(call)
        while True:
            call = self._queue.get()
            if call is None:
                return
            self._dispatch(call)

    def _dispatch(self, call: Call) -> None:
        with self._lock:
            self._next += 1
            local_id = self._next
            method, params = self._as_hermes_call(call)
            self._calls[local_id] = (call, method)
        request = {"jsonrpc": "2.0", "id": local_id, "method": method, "params": params}
        try:
            try:
                response = server.dispatch(request, self.transport)
            except Exception as exc:
                with self._lock:
                    self._calls.pop(local_id, None)
                call.fail(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
                return
            if response is not None:
                self.on_response(response)
        finally:
            if self._builds and threading.get_ident() == self._dispatcher:
                self._start_builds()
        if call.method in ("approval.respond", "clarify.respond", "sudo.respond", "secret.respond"):
            self._refresh_state()

    def _as_hermes_call(self, call: Call) -> tuple[str, dict]:
        """A resume of the session live here (the broker found it by runtime id or stored key: a client's
        recovery) is answered from the live session, as Hermes' `session.activate` does: Hermes' own resume
        looks the key up in its database first, and a session that has not run a turn has no row yet."""
        if call.method == "session.resume" and self.sid is not None:
            return "session.activate", {"session_id": self.sid}
        return call.method, call.params

    def on_response(self, obj: dict) -> None:
        """Any thread: one response from Hermes, matched to its call by the local id."""
        obj = self.redact(obj)
        with self._lock:
            entry = self._calls.pop(obj.get("id"), None)  # type: ignore[arg-type]
            if entry is None:
                return
            call, method = entry
            if call.answered:
                return
            call.answered = True
            error = obj.get("error")
            if isinstance(error, dict):
                text = _dumps({"jsonrpc": "2.0", "id": call.id, "error": error})
                self.ch.respond(call.rid, text)
                return
            result = obj.get("result")
            if call.method == "session.resume" and method == "session.activate" and isinstance(result, dict):
                result = {**result, "resumed": self.key}  # what Hermes' resume adds to the same live payload
            bind = None
            if not self.lobby and self.sid is None and method in ("session.create", "session.resume") \
                    and isinstance(result, dict) and isinstance(result.get("session_id"), str):
                bind = self._bind(result)
            self.ch.respond(call.rid, _dumps({"jsonrpc": "2.0", "id": call.id, "result": result}), bind)
            if bind is not None:
                early, self._early = self._early, []
                for params in early:
                    self._forward(params)

    def _bind(self, result: dict) -> dict:
        """Called under the lock: this worker now hosts the session the response names."""
        self.sid = str(result["session_id"])
        self.key = str(result.get("session_key") or result.get("stored_session_id") or result.get("resumed") or "")
        info = result.get("info") if isinstance(result.get("info"), dict) else {}
        self.model = str(info.get("model") or "")
        self.title = str(info.get("title") or result.get("title") or "")
        started = result.get("started_at")
        self.started_at = float(started) if isinstance(started, (int, float)) else time.time()
        self.ch.sid = self.sid
        self.meta_dirty = True
        # the title tests and hermes-ps read; set here, as the bind happens off the main thread
        set_title(worker_title("session", self.sid, self.key))
        return {"sid": self.sid, "key": self.key, **self.meta()}

    # -- events ---------------------------------------------------------------
    def on_event(self, params: dict) -> None:
        """Any thread: an event Hermes emitted; sent on with its shape kept and a `seq` added."""
        params = self.redact(params)
        type_ = str(params.get("type") or "")
        self._note(type_, params.get("payload") if isinstance(params.get("payload"), dict) else {})
        with self._lock:
            if self.lobby:
                return  # the lobby hosts no session: nobody is attached to its events
            if self.sid is None:
                if len(self._early) < 1000:
                    self._early.append(params)
                return
            self._forward(params)

    def _forward(self, params: dict) -> None:
        self.ch.emit_params(params)

    def _note(self, type_: str, payload: dict) -> None:
        """Track state and the broker's metadata from the turn's events."""
        if type_ == "message.start":
            self.set_state("working")
        elif type_ == "message.complete":
            self.meta_dirty = True
            if ssl_stock.stats["hit"] or ssl_stock.stocked():
                self._release_stock()
            self._refresh_state()
        elif type_.endswith(".request") and type_ != "input.request":
            self.set_state("waiting")
        elif type_ == "session.title" and isinstance(payload.get("title"), str):
            self.title = payload["title"]
            self.meta_dirty = True
        elif type_ == "session.info":
            if payload.get("model"):
                self.model = str(payload["model"])
            if payload.get("title"):
                self.title = str(payload["title"])
            self.meta_dirty = True

    def _release_stock(self) -> None:
        """The first turn is done: drop the TLS contexts the session's start did not use (worker/hermes/ssl_stock.py)."""
        used, left = ssl_stock.stats["hit"], ssl_stock.release()
        ssl_stock.stats["hit"] = 0
        print(f"hermes-runtime: the session's start took {used} TLS contexts from the spare's stock, {left} unused; "
              f"{probe.stats['taken']} endpoint probes answered early", file=sys.stderr, flush=True)

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.meta_dirty = True
            self.on_state()

    def _session(self) -> dict | None:
        return server._sessions.get(self.sid) if self.sid else None

    def _refresh_state(self) -> None:
        session = self._session()
        if session is not None:
            try:
                status = server._session_live_status(self.sid, session)
            except Exception:
                return
            self.set_state(_STATES.get(status, "idle"))


    # -- the broker's view ----------------------------------------------------
    def meta(self) -> dict:
        if self.lobby:
            return {"store_error": self.store_error, "runtime": "hermes"}
        history: list = []
        session = self._session()
        if session is not None:
            history = list(session.get("history") or [])
        preview = ""
        for msg in history:
            if isinstance(msg, dict) and msg.get("role") == "user":
                content = msg.get("content")
                preview = " ".join(str(content if isinstance(content, str) else "").split())[:80]
                break
        return {"sid": self.sid or "", "key": self.key or "", "title": self.title, "model": self.model,
                "message_count": len(history), "preview": preview, "started_at": self.started_at,
                "runtime": "hermes"}

    # -- the end --------------------------------------------------------------
    def finalize(self, reason: str) -> None:
        """Let Hermes flush and close its session (history, memory, slash worker), then sweep children."""
        self._closing = True
        self._queue.put(None)
        if self.sid is not None:
            closer = threading.Thread(target=self._close, args=(reason,), name="hermes-close", daemon=True)
            closer.start()
            closer.join(stop_budget(self.config).finalize)
        kill_descendants()

    def tick(self) -> None:
        """Main thread, between frames (at least every 0.5 s): reconcile the state with Hermes' own flags, as a
        turn that ended in an exception sends no event. Hermes' check reads a few flags and takes no lock, so it
        needs no thread of its own."""
        now = time.monotonic()
        if now >= self._next_check and self.sid is not None and not self._closing:
            self._next_check = now + STATE_CHECK
            self._refresh_state()

    def _close(self, reason: str) -> None:
        try:
            server._close_session_by_id(self.sid, end_reason=reason)
        except Exception as exc:
            print(f"hermes-runtime: closing {self.sid} failed: {type(exc).__name__}: {exc}", file=sys.stderr,
                  flush=True)

    def record_end(self, key: str, reason: str, at: float) -> None:
        """The lobby's job: a session's worker died without finalizing; end its row in Hermes' database."""
        try:
            db = server._get_db()
            if db is not None:
                db.end_session(key, reason)  # a row already ended keeps its reason
        except Exception as exc:
            print(f"hermes-runtime: could not record the end of {key}: {exc}", file=sys.stderr, flush=True)


