"""One line per event, key=value (or JSON with --log-format json), to stderr."""

from __future__ import annotations

import json
import logging
import sys
import time

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
            text = str(value)
            if " " in text or text == "":
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)


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
