"""The words both sides use for a worker's life: kinds, states, stop reasons, hello/heartbeat meta, capabilities.

The broker reads these from frames and writes them into the session store and the
metrics; a name changed on one side only would silently stop matching on the other.
"""

from __future__ import annotations

from typing import Final, TypedDict

# -- kinds: what a worker process is for -------------------------------------
LOBBY: Final = "lobby"  # session-less global methods; records the ends of sessions whose worker died
SPARE: Final = "spare"  # started and registered, waiting in the warm pool for a create/resume
SESSION: Final = "session"  # owns one session
KINDS: Final = frozenset({LOBBY, SPARE, SESSION})

# -- states: what a worker reports in its heartbeats ---------------------------
STARTING: Final = "starting"  # forked, not registered yet (the broker's own view, never sent)
IDLE: Final = "idle"
WORKING: Final = "working"  # a turn is running
WAITING: Final = "waiting"  # a turn waits for the user (approval, clarify, sudo, secret)
CLOSING: Final = "closing"  # a stop began (the broker's own view, never sent)
BUSY_STATES: Final = frozenset({WORKING, WAITING})


class Reason:
    """Why a worker stopped: the stop frame's reason, the `worker stopped` log line, the store's end_reason."""

    WS_ORPHAN_REAP: Final = "ws_orphan_reap"  # detached past reap_grace, or close_on_disconnect
    BUSY_STALE: Final = "busy_stale"  # detached mid-turn and silent for busy_stale
    HEARTBEAT_LOST: Final = "heartbeat_lost"  # silent for liveness x interval, or never registered
    CLIENT_CLOSE: Final = "client_close"  # session.close
    EVICTED: Final = "evicted"  # its slot was needed (max_workers)
    SURPLUS: Final = "surplus"  # a spare the pool did not need, or a worker that misbehaved on its start
    SPAWN_TIMEOUT: Final = "spawn_timeout"  # did not answer create/resume in time
    SHUTDOWN: Final = "shutdown"
    OPERATOR_KILL: Final = "operator_kill"  # hermes-ps --kill / the control endpoint (default reason)
    WORKER_EXIT: Final = "worker_exit"  # it exited on its own (crash)
    GATEWAY_LOST: Final = "gateway_lost"  # it died with a killed gateway (recorded at the next start)
    SIGTERM: Final = "sigterm"  # the worker's own word: a SIGTERM reached it


class WorkerMeta(TypedDict, total=False):
    """The `meta` map of hello and heartbeat frames: what a worker tells the broker about itself.

    Sent in full in the hello and whenever it changed, with the next heartbeat. The broker keeps
    the last value of each key (hermes-ps, session.active_list, resume by title)."""

    sid: str  # the session's runtime id ("" until a session is bound)
    key: str  # its stored key
    title: str
    model: str
    message_count: int
    preview: str  # the first user message, shortened
    started_at: float  # wall clock
    runtime: str  # builtin | hermes
    store_error: str  # lobby: why the session store is unusable ("" when it is fine)


# -- capabilities: what a worker announces in its hello ------------------------
HOSTS_SESSION_METHODS: Final = "hosts_session_methods"  # answers every method naming its session, not only
#                                                         the ones in protocol.methods (Hermes' own dispatch)
