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

Importing this module imports the heavy Hermes modules, runs Hermes' environment probe
and fills its tool-definition and config caches, so the fork server pays for them once.
Hermes starts two threads when `tui_gateway.server` is imported (an update-check prefetch
and an idle reaper); a process that forks must not have threads, so every thread start
during these imports is held back, to be made after the fork, in the worker — except
those two, which a worker does not need (see _SKIPPED_THREADS).
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from protocol.jsonrpc import BAD_VALUE, INTERNAL_ERROR
from worker.calls import INLINE
from worker.channel import Call, Channel
from worker.redact import Redactor

# What building an agent and running its first turn import (measured on 0.19.0: ~1500 modules, most of them
# openai.*), so that a forked worker finds them in the shared heap instead of importing them per session.
_WARM = (
    "run_agent", "model_tools", "hermes_state", "hermes_cli.runtime_provider", "hermes_cli.models",
    "hermes_cli.tools_config", "hermes_cli.skin_engine", "hermes_cli.input_sanitize", "hermes_cli.active_sessions",
    "tools.approval", "tools.mcp_tool", "tools.checkpoint_manager", "tools.tool_search", "agent.credits_tracker",
    "agent.conversation_loop", "agent.agent_init", "agent.transports.chat_completions", "agent.title_generator",
    "agent.system_prompt", "agent.display", "agent.models_dev", "openai", "openai.resources", "openai.types.chat",
    "httpx", "httpcore", "aiohttp", "unittest.mock", "tui_gateway.synthetic_turn",
    # what a worker still imported after the list above (sys.modules of a forked worker after create + one turn,
    # diffed against the fork server's): 69 modules, ~3 MiB of USS and ~40 ms per session
    "agent.agent_runtime_helpers", "agent.anthropic_adapter", "agent.aux_accounting", "agent.bounded_response",
    "agent.chat_completion_helpers", "agent.coding_context", "agent.copilot_acp_client", "agent.errors",
    "agent.gemini_native_adapter", "agent.gemini_schema", "agent.image_routing", "agent.kanban_stop",
    "agent.rate_limit_tracker", "agent.reactions", "agent.ssl_guard", "agent.ssl_verify", "agent.stream_single_writer",
    "agent.transports.anthropic", "agent.transports.bedrock", "agent.transports.codex", "agent.turn_finalizer",
    "agent.verification_stop", "agent.verify_hooks", "edge_tts", "gateway.session_context", "glob",
    "hermes_cli.mcp_startup", "hermes_cli.moa_config", "hermes_cli.model_normalize", "hermes_cli.profiles",
    "hermes_cli.projects_db", "hermes_cli.sqlite_util", "packaging.specifiers", "packaging.tags", "packaging.version",
    "psutil", "resource", "tools.computer_use.cua_backend", "tools.hook_output_spill", "tools.lazy_deps",
    "tools.schema_sanitizer", "tui_gateway._stdin_recovery", "xml.sax",
)


def _warm_caches() -> None:
    """Fill Hermes' per-process caches here, once, as its own gateway does on its first session.

    Building an agent asks `model_tools.get_tool_definitions()`, which probes every tool's availability
    (~30 check functions: imports, config, the OpenRouter model list) and memoizes the result for the
    process's lifetime, keyed by the toolsets, the registry generation and config.yaml's mtime; and
    `session.create` parses config.yaml (`_load_cfg`, cached on its mtime). A worker forked from here finds
    both for the same key and skips ~100-200 ms of probes and a YAML parse per session; an edited
    config.yaml changes the key and the worker reads it again, as Hermes would. The probes' warnings
    ("check_fn ... returned False") are the worker's business: here they are not printed to the gateway log."""
    import logging

    root = logging.getLogger()
    quiet = logging.NullHandler()  # with a handler on the root, logging's last-resort stderr printer stays off
    root.addHandler(quiet)
    try:
        import model_tools

        server._load_cfg()
        model_tools.get_tool_definitions(enabled_toolsets=server._load_enabled_toolsets(), quiet_mode=True)
    except Exception as exc:  # a warm-up only: the worker computes them itself
        print(f"hermes-runtime: warming Hermes' caches failed: {exc}", file=sys.stderr, flush=True)
    finally:
        root.removeHandler(quiet)


# -- import Hermes with thread starts held back (the fork server must stay single-threaded) --------
_held: list[threading.Thread] = []
_real_start = threading.Thread.start


def _hold(self: threading.Thread) -> None:
    _held.append(self)


threading.Thread.start = _hold  # type: ignore[method-assign]
try:
    import tui_gateway.server as server

    for _name in _WARM:
        try:
            importlib.import_module(_name)
        except Exception as _exc:  # a warm-up only: the worker imports it again when it needs it
            print(f"hermes-runtime: preloading {_name} failed: {_exc}", file=sys.stderr, flush=True)
    try:  # the python/pip/PEP 668 probe of the system prompt: ~1 s of subprocesses, once here, not per session
        from tools import env_probe

        env_probe._probe_worker(env_probe._PROBE_GEN)  # what its probe thread runs, run synchronously
    except Exception as _exc:
        print(f"hermes-runtime: environment probe failed: {_exc}", file=sys.stderr, flush=True)
    _warm_caches()
finally:
    threading.Thread.start = _real_start  # type: ignore[method-assign]

_EagerSlashWorker = server._SlashWorker  # Hermes' own: a subprocess started at construction

# Held threads never started in a worker: the update check runs git and the network (in every process);
# the idle reaper closes sessions whose transport died hours ago, which ours never does (reaping is the broker's).
_SKIPPED_THREADS = ("prefetch_update_check", "_start_idle_reaper")
_threads_started = False

# A bound worker hosts exactly one session: methods that would open a second one here are refused.
_ONE_SESSION_ONLY = frozenset({"session.branch"})
_STATES = {"working": "working", "waiting": "waiting"}  # Hermes' live status -> the broker's; else idle
FINALIZE_TIMEOUT = 2.0  # s: the broker's stop ladder sends SIGTERM after stop_timeout / 2
PR_SET_CHILD_SUBREAPER = 36


def held_threads() -> list[str]:
    """Names of the thread starts held back at import (for tests and docs)."""
    return [_describe(t) for t in _held]


def _describe(t: threading.Thread) -> str:
    target = getattr(t, "_target", None)
    return getattr(target, "__qualname__", None) or t.name


def _start_held_threads() -> None:
    global _threads_started
    if _threads_started:
        return
    _threads_started = True
    for t in _held:
        if not any(skip in _describe(t) for skip in _SKIPPED_THREADS):
            _real_start(t)


def _no_update_check() -> None:
    """The update check is not run (see _SKIPPED_THREADS): say it is done, with no result, so session.info
    does not wait 0.5 s for it (twice per session) — the TUI then shows no update badge."""
    try:
        from hermes_cli import banner

        banner._update_check_done.set()
    except (ImportError, AttributeError):
        pass


def _become_subreaper() -> None:
    """Orphans of this worker's children (a tool's double-forked daemon) are re-parented here, so the
    final sweep can find them."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass


class _GroupedSubprocess:
    """`subprocess` as Hermes' server module sees it in a worker: the slash worker stays in our group.

    Hermes starts its slash-worker subprocess in a new session (so a stray killpg in
    the TUI cannot take the TUI down). Here the worker is the group leader and the
    broker reclaims a session by killing that group, so the child must stay in it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 (the stdlib's name)
        kwargs["start_new_session"] = False
        return subprocess.Popen(*args, **kwargs)


class _LazySlashWorker:
    """Hermes' slash worker, started by the session's first slash command instead of with the session.

    Hermes starts `python -m tui_gateway.slash_worker` (a fresh interpreter that imports
    Hermes: ~37 MiB USS, ~0.3 s of CPU) for every session it creates or resumes, in
    one shared process; here every session already is a process of its own, and most
    never send a `slash.exec` (the TUI handles most commands itself). The first one
    pays the start, as it would in Hermes when it follows session.create closely.
    Hermes only calls run() and close() on it."""

    def __init__(self, session_key: str, model: str, profile_home: str | None = None) -> None:
        self._args = (session_key, model, profile_home)
        self._lock = threading.Lock()
        self._worker: Any = None
        self._closed = False

    def run(self, command: str) -> str:
        with self._lock:
            if self._closed:
                raise RuntimeError("slash worker closed")
            if self._worker is None:
                key, model, home = self._args
                self._worker = _EagerSlashWorker(key, model, profile_home=home)
            worker = self._worker
        return worker.run(command)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()


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
    """The worker's runtime (same duck interface as SessionRuntime): handle, finalize, state, meta."""

    dispatches_off_main = True  # handle() only queues: Hermes runs the call on its dispatcher thread

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
        self._queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self.transport = _Transport(self)
        _start_held_threads()
        _no_update_check()
        _become_subreaper()
        server.subprocess = _GroupedSubprocess()  # type: ignore[attr-defined]
        server._SlashWorker = _LazySlashWorker  # type: ignore[attr-defined]
        server._stdio_transport = self.transport  # frames with no session transport come to us, not stdout
        if self.lobby:
            self._check_store()
        threading.Thread(target=self._dispatch_loop, name="hermes-dispatch", daemon=True).start()
        threading.Thread(target=self._watch, name="hermes-state", daemon=True).start()

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
        if call.method == "session.resume" and self.sid is not None and self.key:
            # the broker found this session live here (by runtime id or stored key): Hermes re-uses a live
            # session when asked for its stored key, so a client's recovery by runtime id works too
            call.params = dict(call.params, session_id=self.key)
        if call.method in INLINE:  # unblocks or stops a turn: never behind a slow call on the dispatcher
            threading.Thread(target=self._dispatch, args=(call,), name="hermes-fast", daemon=True).start()
        else:
            self._queue.put(call)

    def _dispatch_loop(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            self._dispatch(call)

    def _dispatch(self, call: Call) -> None:
        with self._lock:
            self._next += 1
            local_id = self._next
            self._calls[local_id] = (call, call.method)
        request = {"jsonrpc": "2.0", "id": local_id, "method": call.method, "params": call.params}
        try:
            response = server.dispatch(request, self.transport)
        except Exception as exc:
            with self._lock:
                self._calls.pop(local_id, None)
            call.fail(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
            return
        if response is not None:
            self.on_response(response)
        if call.method in ("approval.respond", "clarify.respond", "sudo.respond", "secret.respond"):
            self._refresh_state()

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
        from worker.main import _set_title, _title  # the title tests and hermes-ps read; set here, not
        _set_title(_title("session", self))          # on the next call, as the bind happens off the main thread
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

    def _watch(self) -> None:
        """Reconcile the state with Hermes' own flags (a turn that ended in an exception sends no event)."""
        while not self._closing:
            time.sleep(0.5)
            if self.sid is not None:
                self._refresh_state()

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
            closer.join(FINALIZE_TIMEOUT)
        _kill_descendants()

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


def _kill_descendants() -> None:
    """Everything this worker started, including children that left our group (tools start theirs in
    new sessions): kill their groups and them. The broker's group kill is the backstop."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:
        return
    own = os.getpgid(0)
    for child in children:
        try:
            pgid = os.getpgid(child.pid)
            if pgid != own:
                os.killpg(pgid, signal.SIGKILL)
            child.kill()
        except (OSError, Exception):
            pass
