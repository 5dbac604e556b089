"""Hermes' provider TLS context, built once per CA bundle instead of once per model request.

Every model request of a turn builds a fresh OpenAI client with a fresh httpx client
(`AIAgent._create_request_openai_client`, Hermes' guard against reusing a closed
transport), and every one of them loads a CA bundle into a new SSL context:
`agent.ssl_verify.resolve_httpx_verify` loads `HERMES_CA_BUNDLE` / `SSL_CERT_FILE` /
… (~33 ms of CPU per load of /etc/ssl/certs/ca-certificates.crt on this machine), and
with none set, httpx loads certifi's bundle three times (the client and its two
mounted transports, ~50 ms). That was half of a turn's CPU. The context depends only
on the bundle, so it is kept per (path, size, mtime, inode): the clients of every
request share it, as httpx recommends (`verify=<SSLContext>`); an edited or replaced
bundle gives a new context, a failure is never kept. Only Hermes' provider clients
(what `resolve_httpx_verify` answers) get it; `ssl_verify: false` is left alone.
Installed and filled in the fork server, so workers share the loaded store.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any, Callable

_lock = threading.Lock()
_contexts: dict[tuple, ssl.SSLContext] = {}
_MAX = 16  # distinct bundles kept (a provider's ssl_ca_cert each); past it the oldest goes


def _identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _kept(key: tuple | None, build: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    if key is None:
        return build()
    with _lock:
        ctx = _contexts.get(key)
    if ctx is None:
        ctx = build()  # raises as Hermes' own call would: nothing is kept
        with _lock:
            ctx = _contexts.setdefault(key, ctx)
            while len(_contexts) > _MAX:
                del _contexts[next(iter(_contexts))]
    return ctx


class _Ssl:
    """The `ssl` module as `agent.ssl_verify` sees it: a bundle's context is kept."""

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)

    @staticmethod
    def create_default_context(purpose: Any = ssl.Purpose.SERVER_AUTH, *, cafile: Any = None, capath: Any = None,
                               cadata: Any = None) -> ssl.SSLContext:
        if purpose != ssl.Purpose.SERVER_AUTH or capath is not None or cadata is not None or not cafile:
            return ssl.create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)
        key = _identity(str(cafile))
        return _kept(None if key is None else ("cafile", *key),
                     lambda: ssl.create_default_context(purpose, cafile=cafile))


def default_context() -> ssl.SSLContext:
    """What httpx builds for `verify=True` (SSL_CERT_FILE, else SSL_CERT_DIR, else certifi), kept per bundle."""
    import certifi
    import httpx

    if os.environ.get("SSL_CERT_FILE"):
        key = _identity(os.environ["SSL_CERT_FILE"])
    elif os.environ.get("SSL_CERT_DIR"):
        key = _identity(os.environ["SSL_CERT_DIR"])  # a directory: its certificates are read at each handshake
    else:
        key = _identity(certifi.where())
    key = None if key is None else ("httpx-default", *key)
    return _kept(key, lambda: httpx.create_ssl_context(verify=True))


def _with_default_context(resolve: Callable[..., Any]) -> Callable[..., Any]:
    def resolve_httpx_verify(*args: Any, **kwargs: Any) -> Any:
        verify = resolve(*args, **kwargs)
        if verify is True:
            try:
                return default_context()
            except Exception:
                return True  # httpx builds its own and reports what is wrong, as in Hermes
        return verify

    resolve_httpx_verify.__wrapped__ = resolve  # type: ignore[attr-defined]
    return resolve_httpx_verify


def install() -> bool:
    """Wrap Hermes' TLS resolution (once) and fill it for this process's environment; False without Hermes."""
    try:
        from agent import ssl_verify
    except ImportError:
        return False
    if not isinstance(ssl_verify.ssl, _Ssl):
        ssl_verify.ssl = _Ssl()  # type: ignore[assignment]
    if not hasattr(ssl_verify.resolve_httpx_verify, "__wrapped__"):
        ssl_verify.resolve_httpx_verify = _with_default_context(ssl_verify.resolve_httpx_verify)
    try:
        ssl_verify.resolve_httpx_verify()  # the bundle the environment names, loaded once for every worker
    except Exception:
        pass  # a request reports it, as Hermes would
    return True
