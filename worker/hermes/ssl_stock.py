"""Fresh TLS contexts made ahead of time, in a spare's idle time, for its session's start.

Every HTTP client Hermes makes builds a new `ssl.create_default_context(cafile=...)`
(httpx's default, and Hermes' own `agent.ssl_verify`), which parses the whole CA
bundle: ~30 ms of CPU and ~0.7 MiB each on this machine. An agent build makes three
(the endpoint's context-length probes and the provider client), so a session's start
paid ~100 ms for them (a model request's client takes the context shared per bundle,
worker/hermes/tls_context.py, which covers the provider client too).

A spare makes the contexts its rehearsal asked for, once more, before it is handed
a session; `ssl.create_default_context` then hands out one of those when asked for
the same thing: same purpose, same `cafile` (path, size, mtime, inode unchanged: the
same certificates) and the same SSLKEYLOGFILE. Each stocked context is handed out
once and was never used, so a caller gets what it would have made itself, only made
earlier; anything else (capath, cadata, another file, an edited one, an empty
stock) is made on the spot as before. What is left once the session's first turn
is done is dropped (`release`).
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
from collections import Counter
from typing import Any, Callable

_lock = threading.Lock()
_stock: dict[tuple, list[ssl.SSLContext]] = {}
_asked: Counter[tuple] = Counter()  # what was asked for since the last stocking, by key
stats = Counter()  # "hit" / "miss" (for tests and logs)
_real: Callable[..., ssl.SSLContext] | None = None


def _key(purpose: Any, cafile: Any, capath: Any, cadata: Any) -> tuple | None:
    """What decides a context's content; None for what is never stocked."""
    if purpose is not ssl.Purpose.SERVER_AUTH or capath is not None or cadata is not None:
        return None
    if not isinstance(cafile, (str, os.PathLike)):
        return None
    path = os.fspath(cafile)
    try:
        st = os.stat(path)
    except OSError:
        return None
    keylog = "" if sys.flags.ignore_environment else os.environ.get("SSLKEYLOGFILE", "")
    return (path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, keylog)


def _create_default_context(purpose: Any = ssl.Purpose.SERVER_AUTH, *, cafile: Any = None, capath: Any = None,
                            cadata: Any = None) -> ssl.SSLContext:
    assert _real is not None
    key = _key(purpose, cafile, capath, cadata)
    if key is not None:
        with _lock:
            _asked[key] += 1
            pile = _stock.get(key)
            if pile:
                stats["hit"] += 1
                return pile.pop()
            stats["miss"] += 1
    return _real(purpose, cafile=cafile, capath=capath, cadata=cadata)


def install() -> None:
    """Route `ssl.create_default_context` through the stock (once per process)."""
    global _real
    if _real is None:
        _real = ssl.create_default_context
        ssl.create_default_context = _create_default_context  # type: ignore[assignment]


def forget() -> None:
    """Start counting demand afresh (before the rehearsal whose demand `stock_asked` repeats)."""
    with _lock:
        _asked.clear()


def stock_asked(extra: int = 0) -> int:
    """Make, per key asked for since `forget()`, as many contexts as were asked for plus `extra`; returns how many."""
    assert _real is not None, "install() first"
    with _lock:
        wanted = {key: n + extra for key, n in _asked.items()}
    made = 0
    for key, n in wanted.items():
        for _ in range(n):
            try:
                ctx = _real(ssl.Purpose.SERVER_AUTH, cafile=key[0])
            except Exception:
                break  # the caller makes it on the spot and gets Hermes' error there
            if _key(ssl.Purpose.SERVER_AUTH, key[0], None, None) != key:
                break  # the file changed while we read it: stock nothing for the old one
            with _lock:
                _stock.setdefault(key, []).append(ctx)
            made += 1
    return made


def stocked() -> int:
    with _lock:
        return sum(len(pile) for pile in _stock.values())


def release() -> int:
    """Drop what is left of the stock; returns how many contexts were dropped."""
    with _lock:
        left = sum(len(pile) for pile in _stock.values())
        _stock.clear()
    return left
