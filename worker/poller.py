"""The notification poller: drains background-task completions into session events."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable


@dataclass(slots=True)
class Completion:
    task_id: str
    text: str
    status: str = "complete"


class NotificationPoller:
    def __init__(self, emit: Callable[[str, dict], None]) -> None:
        self.emit = emit
        self.completions: queue.SimpleQueue[Completion | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="notification-poller", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            done = self.completions.get()
            if done is None:
                return
            self.emit("background.complete", {"task_id": done.task_id, "text": done.text, "status": done.status})
            self.emit("status.update", {"kind": "background", "text": f"background task {done.task_id} {done.status}"})

    def stop(self) -> None:
        self.completions.put(None)
