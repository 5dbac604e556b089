"""The isolated HERMES_HOME of the `hermes` runtime: <data-dir>/hermes-home, configured from the gateway's settings.

Hermes reads HERMES_HOME once, when `tui_gateway.server` is imported, and the fork
server imports it before forking. So the broker calls `prepare()` before it starts
the fork server and puts the returned variables into the environment the fork
server inherits. This module imports no Hermes code: the broker stays agent-free.

The gateway owns only the `model:` section of `config.yaml`, and only when a base
URL or a provider is configured (`--openai-base-url`, `--hermes-provider`); every
other key (what the TUI's `config.set` writes, what `hermes setup` writes) is kept.
"""

from __future__ import annotations

import importlib.util
import os
import stat
from typing import Any

HOME_NAME = "hermes-home"


class HermesHomeError(OSError):
    """The runtime cannot start: hermes-agent missing, home unwritable, key file unreadable, bad YAML."""


def home_path(data_dir: str) -> str:
    return os.path.join(data_dir, HOME_NAME)


def read_key_file(path: str) -> str:
    """The API key in `path` (first line); refuses a file others can read."""
    try:
        with open(path, encoding="utf-8") as fh:
            if os.fstat(fh.fileno()).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise HermesHomeError(f"API key file {path} is readable by others: chmod 600 it")
            return fh.readline().strip()
    except HermesHomeError:
        raise
    except OSError as exc:
        raise HermesHomeError(f"API key file {path}: {exc.strerror or exc}") from None


def model_section(cfg: dict[str, Any]) -> dict[str, str] | None:
    """The `model:` block the gateway's settings ask for, or None to leave config.yaml's own."""
    base_url = str(cfg.get("openai_base_url") or "").strip()
    provider = str(cfg.get("hermes_provider") or "").strip() or ("custom" if base_url else "")
    if not provider:
        return None
    section = {"provider": provider}
    if cfg.get("openai_model"):
        section["default"] = str(cfg["openai_model"])
    if base_url:
        section["base_url"] = base_url
    if cfg.get("openai_api_key_file"):
        section["api_key"] = read_key_file(str(cfg["openai_api_key_file"]))
    return section


def prepare(cfg: dict[str, Any]) -> dict[str, str]:
    """Create the home (0700) and its config.yaml (0600); returns the env the fork server needs."""
    if importlib.util.find_spec("tui_gateway") is None:
        raise HermesHomeError("--runtime hermes needs hermes-agent: pip install 'hermes-supervisor[hermes]'")
    home = home_path(str(cfg["data_dir"]))
    try:
        os.makedirs(home, mode=0o700, exist_ok=True)
        os.chmod(home, 0o700)
    except OSError as exc:
        raise HermesHomeError(f"cannot create {home}: {exc.strerror}") from None
    section = model_section(cfg)
    if section is not None:
        _write_model(os.path.join(home, "config.yaml"), section)
    return {"HERMES_HOME": home}


def _write_model(path: str, section: dict[str, str]) -> None:
    try:
        import yaml  # a dependency of hermes-agent: present whenever the runtime can run
    except ImportError:
        raise HermesHomeError("the hermes runtime needs the `hermes` extra: pip install 'hermes-supervisor[hermes]'")
    data: Any = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise HermesHomeError(f"{path}: {exc}") from None
        if not isinstance(data, dict):
            raise HermesHomeError(f"{path}: expected a mapping at the top level")
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    wanted = {k: v for k, v in {**model, **section}.items() if k in section or k not in ("base_url", "api_key")}
    if wanted == data.get("model"):
        return  # unchanged: keep the mtime the TUI polls
    data["model"] = wanted
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("# model: is written by hermes-gateway from its settings; the rest is yours\n")
        yaml.safe_dump(data, fh, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)
