"""Hermes' context-length probes of the session's endpoint, started when the session is created.

Every agent build asks the model's endpoint for its context length (`agent.model_metadata`:
Ollama's `/api/show`, then the local server's `/v1/models/...` and `/v1/models`), one
request after another, and Hermes keeps only a positive answer (30 s): an endpoint that
does not say (most OpenAI-compatible servers) is asked again by every build. Those waits
sit in the middle of the build, after ~40 ms of CPU.

A rehearsing spare records which probes its build made (function and arguments). When
Hermes then creates the session (before its response goes out), the same probes start on
a thread of their own, in the same order, through Hermes' own functions (its cache rules
apply); the build's call with the same arguments takes that answer instead of asking
again. Each answer is taken once and only within a few seconds of the create, so the
session's build gets what it would have got by asking itself ~30 ms later. A session
created with its own model, provider or profile gets no early probes (its build may ask
something else, and asking what it will not use is not ours to add); nor does a second
session in the same process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

NAMES = ("_query_ollama_api_show", "_query_local_context_length")
MAX_AGE = 5.0  # s: an answer older than this (from the create) is not taken; the build asks itself

_lock = threading.Lock()
_original: dict[str, Callable[..., Any]] = {}
_recording = False
_recorded: list[tuple[str, tuple]] = []
_flights: dict[tuple, "_Flight"] = {}
stats = {"taken": 0, "started": 0}


@dataclass
class _Flight:
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    ok: bool = False  # False: the probe raised; the build's call then asks itself, and raises as Hermes would


def _args(model: Any, base_url: Any, api_key: Any = "") -> tuple:
    return (model, base_url, api_key)


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def probe(model: str, base_url: str, api_key: str = "") -> Any:
        args = _args(model, base_url, api_key)
        with _lock:
            if _recording:
                _recorded.append((name, args))
            flight = _flights.pop((name, args), None)
        if flight is not None and time.monotonic() - flight.started < MAX_AGE:
            flight.done.wait(MAX_AGE)
            if flight.done.is_set() and flight.ok:
                with _lock:
                    stats["taken"] += 1
                return flight.result
        return original(model, base_url, api_key=api_key)

    probe.__wrapped__ = original  # type: ignore[attr-defined]
    return probe


def install() -> bool:
    """Route Hermes' two probes through here (once per process); False when Hermes has neither."""
    try:
        from agent import model_metadata
    except ImportError:
        return False
    with _lock:
        for name in NAMES:
            fn = getattr(model_metadata, name, None)
            if fn is None or name in _original:
                continue
            _original[name] = fn
            setattr(model_metadata, name, _wrap(name, fn))
    return bool(_original)


def record(on: bool) -> None:
    """Between record(True) and record(False) (the rehearsal), remember the probes made and their arguments."""
    global _recording
    with _lock:
        if on:
            _recorded.clear()
        _recording = on


def start() -> int:
    """The session exists: make the rehearsal's probes now, once, in their order; returns how many were started."""
    with _lock:
        todo, _recorded[:] = list(_recorded), []
        flights = []
        for name, args in todo:
            if name in _original and (name, args) not in _flights:
                flight = _flights[(name, args)] = _Flight()
                flights.append((name, args, flight))
        stats["started"] += len(flights)
    if flights:
        threading.Thread(target=_fly, args=(flights,), name="hermes-probe", daemon=True).start()
    return len(flights)


def _fly(flights: list[tuple[str, tuple, _Flight]]) -> None:
    for name, (model, base_url, api_key), flight in flights:
        try:
            flight.result = _original[name](model, base_url, api_key=api_key)
            flight.ok = True
        except Exception:
            pass
        finally:
            flight.done.set()
