"""Hermes' CA-bundle check, done once per bundle file instead of once per agent build.

Every agent build calls `agent.ssl_guard.verify_ca_bundle()`, which loads each CA
bundle into a throwaway SSL context to prove it loads (~30 ms per load on this
machine, ~120 ms per build: a third of `_make_agent`). The answer depends only on the
file, so it is kept per (path, size, mtime) for this process (and, filled in the fork
server, for every worker forked from it); an edited or replaced bundle is checked
again, and a failure is never kept, so a broken bundle still fails every build as in
Hermes.
"""

from __future__ import annotations

import os
from typing import Any, Callable

_checked: set[tuple] = set()


def _key(label: str, value: str, require_substantial: bool) -> tuple | None:
    try:
        st = os.stat(os.path.expanduser(value))
    except OSError:
        return None
    return (label, value, require_substantial, st.st_size, st.st_mtime_ns, st.st_ino)


def _memoized(check: Callable[..., None]) -> Callable[..., None]:
    def validate(label: str, value: str, *, require_substantial: bool = False) -> None:
        key = _key(label, value, require_substantial)
        if key is not None and key in _checked:
            return
        check(label, value, require_substantial=require_substantial)  # raises as Hermes' does
        if key is not None:
            _checked.add(key)

    validate.__wrapped__ = check  # type: ignore[attr-defined]
    return validate


def install() -> Any:
    """Wrap Hermes' bundle check (once) and run it, so the fork server's result is inherited."""
    try:
        from agent import ssl_guard
    except ImportError:
        return None
    if not hasattr(ssl_guard._validate_bundle_path, "__wrapped__"):
        ssl_guard._validate_bundle_path = _memoized(ssl_guard._validate_bundle_path)
    try:
        ssl_guard.verify_ca_bundle()
    except Exception:
        pass  # the build reports it, as Hermes would
    return ssl_guard
