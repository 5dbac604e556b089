"""Configuration: every setting is a flag, an env var HERMES_GATEWAY_<NAME>, and a key of the TOML file.

Precedence: flag > env > file > default. A bad value is a ConfigError whose
message names the setting and where it came from.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, fields
from typing import Any, Callable


class ConfigError(ValueError):
    pass


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "hermes-supervisor")


def _default_runtime_dir() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "hermes-supervisor")
    return f"/tmp/hermes-supervisor-{os.getuid()}"


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 9119
    token: str | None = None
    runtime_dir: str = ""
    data_dir: str = ""
    config: str | None = None
    runtime: str = "builtin"
    agent: str = "echo"
    echo_delay: float = 0.0
    reap_grace: float = 120.0
    list_grace: float = 5.0
    busy_stale: float = 600.0
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    stop_timeout: float = 5.0
    max_workers: int = 64
    max_client_sessions: int = 0  # sessions one connection may hold at once; 0: max(4, max_workers // 4)
    max_worker_queue: int = 1000  # calls that may wait on one worker before more are refused
    warm_pool: int = 1
    log_level: str = "info"
    log_format: str = "text"
    max_frame: int = 4 * 1024 * 1024
    max_batch: int = 64
    ws_ping_interval: float = 4.0  # with the timeout and the 1 s close timeout: a hung client is found in <= 9 s
    ws_ping_timeout: float = 4.0
    client_buffer: int = 8 * 1024 * 1024
    replay_events: int = 1000
    replay_bytes: int = 1024 * 1024
    monitor_interval: float = 300.0
    allowed_origins: str = ""
    persist: bool = True
    slash_timeout: float = 30.0
    background_workers: int = 2  # prompt.background turns running at once, per session
    background_queue: int = 8  # and waiting; one more is answered 4290 naming the limit
    openai_base_url: str = ""
    openai_model: str = ""
    openai_api_key_file: str = ""
    openai_timeout: float = 120.0
    openai_system_prompt: str = ""
    hermes_provider: str = ""
    metrics_auth: str = "token"
    # the front's limits and exposure (docs/security.md)
    max_clients: int = 1000  # connections open at once, handshaking or not
    max_handshakes: int = 64  # connections that have not finished TLS + the request head
    handshake_timeout: float = 2.5  # seconds a connection may take to finish its handshake
    max_inflight: int = 256  # requests one connection may have waiting for an answer
    allowed_hosts: str = ""  # Host names accepted besides those derived from --host
    allow_remote: bool = False  # a non-loopback --host needs this and TLS
    tls_cert: str = ""
    tls_key: str = ""
    token_file: str = ""  # read the token from this file (keeps it out of argv and the environment)
    dashboard: bool = False  # serve Hermes' web dashboard on the gateway's port (docs/dashboard.md)

    def __post_init__(self) -> None:
        self.runtime_dir = self.runtime_dir or _default_runtime_dir()
        self.data_dir = self.data_dir or _default_data_dir()

    def worker_config(self) -> dict[str, Any]:
        """What a worker needs to know (plain data, sent to the fork server)."""
        return {
            "runtime": self.runtime, "agent": self.agent, "echo_delay": self.echo_delay,
            "heartbeat_interval": self.heartbeat_interval, "slash_timeout": self.slash_timeout,
            "stop_timeout": self.stop_timeout,  # the worker derives its finalize waits from it (worker/budget.py)
            "background_workers": self.background_workers, "background_queue": self.background_queue,
            "store_path": os.path.join(self.data_dir, "sessions.db") if self.persist else "",
            "data_dir": self.data_dir, "runtime_dir": self.runtime_dir,
            "openai_base_url": self.openai_base_url, "openai_model": self.openai_model,
            "openai_api_key_file": self.openai_api_key_file, "openai_timeout": self.openai_timeout,
            "openai_system_prompt": self.openai_system_prompt, "hermes_provider": self.hermes_provider,
        }

    @property
    def client_sessions_limit(self) -> int:
        return self.max_client_sessions or max(4, self.max_workers // 4)

    def public(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out.get("token"):
            out["token"] = "***"
        return out


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "port": (lambda v: 0 <= v <= 65535, "a port from 0 to 65535"),
    "runtime": (lambda v: v in ("builtin", "hermes"), "builtin or hermes"),
    "agent": (lambda v: v in ("echo", "openai"), "echo or openai"),
    "echo_delay": (_non_negative, "a number of seconds ≥ 0"),
    "reap_grace": (_non_negative, "a number of seconds ≥ 0"),
    "list_grace": (_non_negative, "a number of seconds ≥ 0"),
    "busy_stale": (_positive, "a number of seconds > 0"),
    "heartbeat_interval": (lambda v: 0.05 <= v <= 60, "seconds from 0.05 to 60"),
    "heartbeat_liveness": (lambda v: 1 <= v <= 100, "an integer from 1 to 100"),
    "stop_timeout": (lambda v: 0.1 <= v <= 600, "seconds from 0.1 to 600"),
    "max_workers": (lambda v: 1 <= v <= 10_000, "an integer from 1 to 10000"),
    "warm_pool": (lambda v: 0 <= v <= 64, "an integer from 0 to 64"),
    "max_client_sessions": (lambda v: 0 <= v <= 10_000, "an integer from 0 (auto) to 10000"),
    "max_worker_queue": (lambda v: 1 <= v <= 1_000_000, "an integer from 1 to 1000000"),
    "log_level": (lambda v: v in ("debug", "info", "warning", "error"), "debug, info, warning or error"),
    "log_format": (lambda v: v in ("text", "json"), "text or json"),
    # a client frame travels on to a worker: it must stay well under the link's limit (protocol.frames.MAX_FRAME)
    "max_frame": (lambda v: 1024 <= v <= 32 * 1024 * 1024, "bytes from 1024 to 32 MiB"),
    "max_batch": (lambda v: 1 <= v <= 10_000, "an integer from 1 to 10000"),
    "ws_ping_interval": (_positive, "a number of seconds > 0"),
    "ws_ping_timeout": (_positive, "a number of seconds > 0"),
    "client_buffer": (lambda v: v >= 64 * 1024, "bytes ≥ 65536"),
    "replay_events": (lambda v: v >= 1, "an integer ≥ 1"),
    "replay_bytes": (lambda v: v >= 1024, "bytes ≥ 1024"),
    "monitor_interval": (_positive, "a number of seconds > 0"),
    "slash_timeout": (_positive, "a number of seconds > 0"),
    "background_workers": (lambda v: 1 <= v <= 64, "an integer from 1 to 64"),
    "background_queue": (lambda v: 0 <= v <= 10_000, "an integer from 0 to 10000"),
    "openai_timeout": (_positive, "a number of seconds > 0"),
    "metrics_auth": (lambda v: v in ("token", "loopback"), "token or loopback"),
    "max_clients": (lambda v: 1 <= v <= 1_000_000, "an integer from 1 to 1000000"),
    "max_handshakes": (lambda v: 1 <= v <= 100_000, "an integer from 1 to 100000"),
    "handshake_timeout": (lambda v: 0.1 <= v <= 60, "seconds from 0.1 to 60"),
    "max_inflight": (lambda v: 1 <= v <= 1_000_000, "an integer from 1 to 1000000"),
}

_FIELD_TYPES = {f.name: f.type for f in fields(Config)}


def _convert(name: str, raw: Any, source: str) -> Any:
    typ = str(_FIELD_TYPES[name])
    try:
        if "bool" in typ:
            if isinstance(raw, bool):
                value = raw
            elif str(raw).lower() in ("1", "true", "yes", "on"):
                value = True
            elif str(raw).lower() in ("0", "false", "no", "off"):
                value = False
            else:
                raise ValueError(raw)
        elif "int" in typ:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            value = int(raw)
        elif "float" in typ:
            if isinstance(raw, bool):
                raise ValueError(raw)
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(raw)
        else:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError(raw)
            value = str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} from {source}: {raw!r} is not a valid {typ.split('|')[0].strip()}") from None
    check = _CHECKS.get(name)
    if check and value is not None and not check[0](value):
        raise ConfigError(f"{name} from {source}: {raw!r} must be {check[1]}")
    return value


def env_name(name: str) -> str:
    return "HERMES_GATEWAY_" + name.upper()


def load(cli: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    """Merge the layers. `cli` holds only the flags that were given (None = not given)."""
    environ = dict(os.environ if environ is None else environ)
    names = [f.name for f in fields(Config)]
    chosen: dict[str, Any] = {}
    config_file = cli.get("config") or environ.get(env_name("config"))
    file_values: dict[str, Any] = {}
    if config_file:
        file_values = read_file(config_file)
    for name in names:
        if cli.get(name) is not None:
            chosen[name] = _convert(name, cli[name], f"--{name.replace('_', '-')}")
        elif env_name(name) in environ and environ[env_name(name)] != "":
            chosen[name] = _convert(name, environ[env_name(name)], env_name(name))
        elif name in file_values:
            chosen[name] = _convert(name, file_values[name], f"{config_file}")
    chosen["config"] = config_file
    if chosen.get("token") == "":
        chosen["token"] = None
    cfg = Config(**chosen)
    cfg.runtime_dir = os.path.abspath(os.path.expanduser(cfg.runtime_dir))
    cfg.data_dir = os.path.abspath(os.path.expanduser(cfg.data_dir))
    return cfg


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    section = raw.get("gateway", raw)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [gateway] must be a table")
    out: dict[str, Any] = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        if name not in _FIELD_TYPES or name == "config":
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        out[name] = value
    return out


LIFECYCLE_KEYS = ("reap_grace", "list_grace", "busy_stale", "heartbeat_interval", "heartbeat_liveness",
                  "stop_timeout", "max_workers", "warm_pool", "log_level", "monitor_interval",
                  "max_client_sessions", "max_worker_queue")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, all defaulting to None so the layers below can fill in."""
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        typ = str(f.type)
        if "bool" in typ:
            parser.add_argument(flag, dest=f.name, default=None, metavar="BOOL", nargs="?", const="true",
                                help=f"(env {env_name(f.name)}; the bare flag means true)")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper().split("_")[-1],
                                help=f"default {getattr(Config(), f.name)!r} (env {env_name(f.name)})"
                                if f.name not in ("runtime_dir", "data_dir") else f"(env {env_name(f.name)})")
