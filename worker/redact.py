"""Secrets the worker holds never go out to a client.

Hermes reads its provider key from HERMES_HOME/config.yaml (model.api_key, where
worker/hermes/home.py puts --openai-api-key-file: Hermes takes a key from the
environment only for a few known hosts), and `config.get {key: "full"}` returns that
file as it is. Every response and event of the hosted runtime passes through here:
fields that name a credential are masked, and the key file's value is masked wherever
else it appears (a slash command's output, an error message quoting the config).
"""

from __future__ import annotations

from typing import Any

MASK = "***"
_FIELDS = frozenset({"api_key", "apikey", "access_token", "refresh_token", "client_secret", "password"})
MIN_SECRET = 8  # shorter values are not masked by value (they would mask ordinary words)


def secret_field(name: str) -> bool:
    low = name.lower()
    return low in _FIELDS or low.endswith("_api_key") or low.endswith("_secret")


class Redactor:
    def __init__(self, secrets: list[str]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)

    @classmethod
    def from_config(cls, config: dict) -> "Redactor":
        """The values this worker must never send: the API key file's content, when there is one."""
        from worker.hermes.home import HermesHomeError, read_key_file

        path = str(config.get("openai_api_key_file") or "")
        try:
            return cls([read_key_file(path)] if path else [])
        except HermesHomeError:
            return cls([])  # the runtime reports an unreadable key itself; nothing of it can leak

    def __call__(self, obj: Any) -> Any:
        """`obj` with secrets masked; the very same object when there was nothing to mask."""
        if isinstance(obj, str):
            for secret in self.secrets:
                if secret in obj:
                    obj = obj.replace(secret, MASK)
            return obj
        if isinstance(obj, dict):
            out, changed = {}, False
            for k, v in obj.items():
                new = MASK if isinstance(k, str) and secret_field(k) and isinstance(v, str) and v else self(v)
                changed = changed or new is not v
                out[k] = new
            return out if changed else obj
        if isinstance(obj, list):
            items = [self(v) for v in obj]
            return items if any(a is not b for a, b in zip(items, obj)) else obj
        return obj
