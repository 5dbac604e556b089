"""The mark every process of one gateway's fork server carries, so a restarted gateway kills only its own.

The fork server starts with MARKER_ENV in its environment; the workers it forks, and
whatever they exec, inherit it. The value names the data dir (the journal's home), so
a gateway recognises the leftovers of a predecessor on the same data dir, and a
workers.json that names some other process of the same user names nothing it will kill.
"""

from __future__ import annotations

import hashlib
import os

MARKER_ENV = "HERMES_SUPERVISOR_WORKER_OF"


def worker_tag(data_dir: str) -> str:
    """A short, stable value per data dir (symlinks resolved)."""
    return hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:24]
