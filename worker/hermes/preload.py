"""Import Hermes into the fork server with thread starts held back, and fill its per-process caches.

A process that forks must not have threads, but importing `tui_gateway.server` starts
two (an update-check prefetch and an idle reaper). Every thread start during these
imports is held back, to be made after the fork, in the worker (`start_held_threads`),
except those two, which a worker does not need (see SKIPPED_THREADS). The fork server
imports this once; every worker forked from it shares the warm heap.
"""

from __future__ import annotations

import importlib
import logging
import logging.handlers
import sys
import threading
import time

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
    # what the slash worker imports (worker/hermes/slash_fork.py forks it from here): HermesCLI and its console
    "hermes_bootstrap", "cli", "rich.console", "tools.ansi_strip", "agent.skill_bundles",
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


def _undo_logging_setup() -> None:
    """Importing `cli` sets up Hermes' logging here: file handlers behind a QueueListener whose thread start is
    held, and whose rebuild (a second handler) then fails to join that unstarted thread, leaving a stop sentinel
    queued, so a worker's listener would exit at once and agent.log stay empty. Undo it: close the files, drop
    the listener and its held thread; each worker sets logging up itself, as before (AIAgent calls setup_logging)."""
    try:
        import hermes_logging as hl
    except ImportError:
        return
    listener = getattr(hl, "_queue_listener", None)
    if listener is None and not getattr(hl, "_queued_file_handlers", None):
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_hermes_queue", False):
            root.removeHandler(handler)
    for handler in hl._queued_file_handlers:
        handler.close()
    hl._queued_file_handlers.clear()
    hl._log_queue = None
    hl._queue_listener = None
    hl._logging_initialized = False
    _held[:] = [t for t in _held if not _is_listener_thread(t)]


def _is_listener_thread(t: threading.Thread) -> bool:
    owner = getattr(getattr(t, "_target", None), "__self__", None)
    return isinstance(owner, logging.handlers.QueueListener)


def _rehearse_slash() -> None:
    """Build one throwaway HermesCLI and run /help in it, as a slash worker does, so its lazily filled module
    state (config, skin, command tables) is in the heap the forked slash workers share: measured, it cuts a
    forked slash worker's own pages by ~2 MiB (worker/hermes/slash_fork.py). Its database handle is closed: no
    descriptor or SQLite state of the fork server's is used by a child."""
    import contextlib
    import io

    try:
        from tui_gateway import slash_worker

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli = slash_worker.HermesCLI(model=None, compact=True, resume="gateway-rehearsal", verbose=False)
            slash_worker._run(cli, "help")
        db = getattr(cli, "_session_db", None)
        if db is not None:
            db.close()
    except Exception as exc:  # a warm-up only
        print(f"hermes-runtime: rehearsing a slash worker failed: {exc}", file=sys.stderr, flush=True)


def _rehearse_agent() -> None:
    """Build and drop one throwaway agent here, before the fork, as a spare's rehearsal does: what a build creates
    lazily once per process (compiled patterns, provider and schema caches, class-level state) then lives in the
    shared heap instead of in every worker's private pages (old/new interleaved, 5 runs x 3 sessions: a worker
    after its first turn 32.7 -> 31.3 MiB USS; a forked slash worker 12.1 -> 12.4, its pages fill more holes of
    the larger heap). Its thread starts are held and dropped (the agent is closed); no database row is written
    (Hermes writes it on the first turn) and the session store it opened is closed."""
    import contextlib
    import io

    before = len(_held)
    t0 = time.perf_counter()
    db = server._db
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            tokens = server._set_session_context("gateway-preload")
            try:
                agent = server._make_agent("gateway-preload", "gateway-preload")
            finally:
                server._clear_session_context(tokens)
            close = getattr(agent, "close", None)
            if callable(close):
                close()
            del agent
        print(f"hermes-runtime: fork server built an agent in {(time.perf_counter() - t0) * 1000:.0f} ms",
              file=sys.stderr, flush=True)
    except Exception as exc:  # a warm-up only
        print(f"hermes-runtime: rehearsing an agent build failed: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
    finally:
        if server._db is not db:  # the build opened Hermes' session store: a child must open its own (SQLite + fork)
            try:
                server._db.close()
            except Exception:
                pass
            server._db = db
    del _held[before:]  # the agent's own threads (none on 0.19.0): it is closed, nothing of it runs in a worker


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
    _rehearse_slash()
    _rehearse_agent()
    _undo_logging_setup()
    from worker.hermes import ca_check

    ca_check.install()
finally:
    threading.Thread.start = _real_start  # type: ignore[method-assign]

# Held threads never started in a worker: the update check runs git and the network (in every process);
# the idle reaper closes sessions whose transport died hours ago, which ours never does (reaping is the broker's).
SKIPPED_THREADS = ("prefetch_update_check", "_start_idle_reaper")
_threads_started = False


def held_threads() -> list[str]:
    """Names of the thread starts held back at import (for tests and docs)."""
    return [_describe(t) for t in _held]


def _describe(t: threading.Thread) -> str:
    target = getattr(t, "_target", None)
    return getattr(target, "__qualname__", None) or t.name


def start_held_threads() -> None:
    global _threads_started
    if _threads_started:
        return
    _threads_started = True
    for t in _held:
        if not any(skip in _describe(t) for skip in SKIPPED_THREADS):
            _real_start(t)


