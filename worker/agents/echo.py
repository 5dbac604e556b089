"""The offline default agent: streams the prompt back one word per delta."""

from __future__ import annotations

import re
import threading
from typing import Generator

from worker.agents.base import AgentEvent, TurnResult

_WORDS = re.compile(r"\s*\S+\s*|\s+")


def split_words(text: str) -> list[str]:
    """Pieces of `text`, each one word with its surrounding blanks; they join back to `text` exactly."""
    return _WORDS.findall(text)


class EchoAgent:
    name = "echo"
    model = "echo"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def run_turn(self, text: str, history: list[dict], cancel: threading.Event) -> Generator[AgentEvent, None, TurnResult]:
        words = split_words(text)
        sent = 0
        for i, word in enumerate(words):
            if cancel.is_set() or (self.delay and i and cancel.wait(self.delay)):
                return TurnResult(status="interrupted", usage=_usage(text, sent))
            yield AgentEvent("message.delta", {"text": word})
            sent += 1
        return TurnResult(status="complete", usage=_usage(text, sent))


def _usage(text: str, sent: int) -> dict:
    prompt = len(text.split())
    return {"input": prompt, "output": sent, "total": prompt + sent}
