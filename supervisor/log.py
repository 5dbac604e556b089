"""One line per event, key=value (or JSON with --log-format json), to stderr."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# anything that could end a line, forge a field or hide one: quote (JSON-escaped) the value
_NEEDS_QUOTES = re.compile(r'[\s"=\x00-\x1f\x7f-\x9f\u2028\u2029]')

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {}) or {}
        if self.json:
            doc = {"ts": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
            doc.update(fields)
            return json.dumps(doc, default=str)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [f"{stamp}.{int(record.msecs):03d}", record.levelname.lower(), record.getMessage()]
        for key, value in fields.items():
            parts.append(f"{key}={escape(str(value))}")
        return " ".join(parts)


def escape(text: str) -> str:
    """A value as one token of a key=value line: quoted with JSON escapes when it is not a plain word."""
    if text == "" or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


logger = logging.getLogger("hermes.gateway")


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    logger.handlers[:] = [handler]
    logger.setLevel(_LEVELS.get(level, logging.INFO))
    logger.propagate = False


def set_level(level: str) -> None:
    logger.setLevel(_LEVELS.get(level, logging.INFO))


def event(name: str, level: int = logging.INFO, **fields) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields})


def info(name: str, **fields) -> None:
    event(name, logging.INFO, **fields)


def warning(name: str, **fields) -> None:
    event(name, logging.WARNING, **fields)


def error(name: str, **fields) -> None:
    event(name, logging.ERROR, **fields)


def debug(name: str, **fields) -> None:
    event(name, logging.DEBUG, **fields)


class Throttled:
    """At most `burst` lines per `window` seconds for an event a local peer can provoke at will.

    The first line after a quiet spell says how many were suppressed, so nothing is hidden
    for long and a flood of forged frames cannot fill the journal.
    """

    def __init__(self, burst: int = 10, window: float = 10.0) -> None:
        self.burst = burst
        self.window = window
        self._start = 0.0
        self._count = 0
        self.suppressed = 0

    def warning(self, name: str, **fields) -> None:
        now = time.monotonic()
        if now - self._start >= self.window:
            self._start, self._count = now, 0
        self._count += 1
        if self._count > self.burst:
            self.suppressed += 1
            return
        if self.suppressed:
            fields["suppressed_since_last"] = self.suppressed
            self.suppressed = 0
        warning(name, **fields)


_throttles: dict[str, Throttled] = {}


def throttled(key: str) -> Throttled:
    """The shared Throttled for one kind of peer-provoked warning (auth, handshake, accept)."""
    t = _throttles.get(key)
    if t is None:
        t = _throttles[key] = Throttled()
    return t
