"""Runtime ids and stored session keys."""

from __future__ import annotations

import re
import secrets
import time

STORED_KEY_RE = re.compile(r"^\d{8}_\d{6}_[0-9a-f]{6}$")
RUNTIME_ID_RE = re.compile(r"^[0-9a-f]{8}$")


def runtime_id() -> str:
    return secrets.token_hex(4)


def stored_key(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(now if now is not None else time.time()))
    return f"{stamp}_{secrets.token_hex(3)}"
