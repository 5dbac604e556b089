"""A worker process: after the fork, connect to the broker, say hello, serve one runtime until stopped."""

from __future__ import annotations

import os
import signal
import sys
import time

from protocol import frames
from protocol.titles import set_title, worker_title
from worker import guard
from worker.budget import stop_budget
from worker.calls import CallRunner
from worker.channel import Call, Channel
from worker.link import Link
from worker.runtime import Runtime
from worker.store import Store, StoreError


def _open_store(config: dict) -> tuple[Store | None, str | None]:
    path = config.get("store_path") or ""
    if not path:
        return None, "persistence disabled"
    try:
        store = Store(path)
        store.check()
        return store, None
    except StoreError as exc:
        print(f"worker: session store unusable: {exc}", file=sys.stderr, flush=True)
        return None, str(exc)


def _runtime(kind: str, config: dict, channel: Channel, store: Store | None, store_error: str | None) -> Runtime:
    if config.get("runtime", "builtin") == "hermes":
        from worker.hermes.runtime import HermesRuntime

        return HermesRuntime(channel, config)  # the lobby too: global methods go through Hermes' dispatch
    if kind == "lobby":
        from worker.lobby import LobbyRuntime

        return LobbyRuntime(config, store, store_error)
    from worker.session import SessionRuntime

    return SessionRuntime(channel, config, store, store_error)


def run(ident: bytes, config: dict, parent_pid: int) -> int:
    if guard.parent_gone(parent_pid):
        guard.exit_group(0)
    kind = config.get("kind", "spare")
    set_title(worker_title(kind))
    link = Link(config["endpoint"], ident, float(config.get("heartbeat_interval", 1.0)))
    channel = Channel(link)
    store, store_error = _open_store(config)
    runtime = _runtime(kind, config, channel, store, store_error)
    budget = stop_budget(config)

    stop_reason: list[str] = []

    def on_term(signum, _frame) -> None:
        stop_reason.append("sigterm")
        link.running = False

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def heartbeat() -> bytes:
        fields: dict = {"state": runtime.state}
        if runtime.meta_dirty:
            runtime.meta_dirty = False
            fields["meta"] = runtime.meta()
        return frames.pack(frames.HB, **fields)

    titled = [False]

    def beat_now() -> None:
        link.post(heartbeat())

    runtime.on_state = beat_now

    def set_title_once() -> None:
        if not titled[0] and runtime.sid:
            titled[0] = True
            set_title(worker_title(kind, runtime.sid, runtime.key or ""))

    # handlers that may wait on the store run on their own thread, so the heartbeats go on (worker/calls.py);
    # a runtime that already hands its calls to a thread of its own (hermes) is called directly
    runner = None if runtime.dispatches_off_main else CallRunner(runtime.handle, set_title_once)

    def later(job) -> None:
        if runner is not None:
            runner.later(job)
        else:
            job()

    def on_frame(frame: dict) -> None:
        kind_ = frame["k"]
        if kind_ == frames.CALL:
            call = Call(channel, frame["rid"], frame.get("id"), frame["method"], frame["params"])
            if runner is not None:
                runner.call(call)
            else:
                runtime.handle(call)
                set_title_once()
        elif kind_ == frames.STOP:
            stop_reason.append(frame["reason"])
            link.running = False
        elif kind_ == frames.HOLD:
            link.hold()
        elif kind_ == frames.RELEASE:
            link.release()
        elif kind_ == frames.ENDED:
            at = frame.get("at")
            at = float(at) if isinstance(at, (int, float)) else time.time()
            later(lambda: runtime.record_end(frame["key"], frame["reason"], at))

    def tick() -> None:
        if guard.parent_gone(parent_pid):  # orphaned (PR_SET_PDEATHSIG covers Linux; this, everywhere): leave
            guard.exit_group(0)
        runtime.tick()
        if runtime.meta_dirty:
            beat_now()

    link.post(frames.pack(frames.HELLO, pid=os.getpid(), kind=kind, meta=runtime.meta(), caps=sorted(runtime.caps)))
    link.serve(on_frame, heartbeat, tick)
    if runner is not None:
        runner.close(timeout=budget.calls)  # a handler still waiting on the store is abandoned: finalize records it
    runtime.finalize(stop_reason[0] if stop_reason else "stopped")
    link.post(frames.pack(frames.BYE, reason=stop_reason[0] if stop_reason else "stopped"))
    link._flush()
    link.close()
    if store is not None:
        store.close()
    guard.exit_group(0)
    return 0
