"""What the front exposes, settled before anything starts: bind, TLS, and where the token comes from.

A bind beyond loopback puts the token on the network, so it needs --allow-remote and
TLS; the token itself is kept out of argv (--token-file) and out of every worker's
environment (HERMES_GATEWAY_TOKEN is removed before the first fork).
"""

from __future__ import annotations

import os
import ssl

from supervisor.clients.access import is_loopback_host
from supervisor.config import Config, env_name

TOKEN_ENV = env_name("token")


class ExposureError(ValueError):
    """A reason not to start, one line (the CLI exits 2 with it)."""


def settle(cfg: Config, environ: dict[str, str] | os._Environ = os.environ) -> ssl.SSLContext | None:
    """Check the bind and TLS, read --token-file, scrub the token from the environment; returns the TLS context."""
    environ.pop(TOKEN_ENV, None)
    if cfg.token_file:
        cfg.token = read_token_file(cfg.token_file)
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ExposureError("--tls-cert and --tls-key go together: give both or neither")
    ctx = tls_context(cfg) if cfg.tls_cert else None
    if not is_loopback_host(cfg.host):
        if not cfg.allow_remote:
            raise ExposureError(f"--host {cfg.host} is not a loopback address: the port and its token would be "
                                f"reachable from the network; pass --allow-remote with --tls-cert/--tls-key to mean it")
        if ctx is None:
            raise ExposureError(f"--host {cfg.host} with --allow-remote needs TLS (--tls-cert and --tls-key): "
                                f"the token must not cross the network in cleartext")
    return ctx


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExposureError(f"--token-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise ExposureError(f"--token-file {path}: the token must be one line of at least 16 printable characters")
    return token


def tls_context(cfg: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ExposureError(f"--tls-cert {cfg.tls_cert} / --tls-key {cfg.tls_key}: cannot load: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    return ctx
