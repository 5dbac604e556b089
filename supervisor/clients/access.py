"""Who may talk to the front: the Host, Origin and token checks every request passes first.

Host defeats DNS rebinding (a page on evil.example whose name now points at 127.0.0.1
still sends `Host: evil.example`); Origin keeps other pages in the user's browser out,
including other local web apps on another port; the token keeps out everyone else.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback_host(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def bind_names(bind: str) -> set[str]:
    """Host names that reach a socket bound to `bind` (what a browser may put in Host)."""
    names = set(LOOPBACK_NAMES) if is_loopback_host(bind) or is_wildcard(bind) else set()
    if not is_wildcard(bind):
        names.add(bind.strip("[]").lower())
        return names
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    names.add(a.address.split("%")[0].lower())
    except Exception:
        pass
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    return names


def split_host(host: str) -> tuple[str, str]:
    """'[::1]:80' -> ('::1', '80'); 'example:8' -> ('example', '8'); 'example' -> ('example', '')."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name.lower(), rest[1:] if rest.startswith(":") else ""
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name.lower(), port
    return host.lower(), ""


class Access:
    def __init__(self, bind: str, allowed_hosts: str, allowed_origins: str, tls: bool) -> None:
        self.names = bind_names(bind) | {h.strip().lower() for h in allowed_hosts.split(",") if h.strip()}
        self.origins = [o.strip() for o in allowed_origins.split(",") if o.strip()]
        self.tls = tls
        self.port = 0

    def host_ok(self, host: str | None) -> bool:
        if not host:
            return False
        name, port = split_host(host)
        if not port:
            port = "443" if self.tls else "80"
        return bool(name) and name in self.names and port == str(self.port)

    def origin_ok(self, origin: str | None, host: str | None) -> bool:
        """No Origin (a non-browser client) passes; a browser's must be this very host and port."""
        if origin is None:
            return True
        if origin in self.origins or "*" in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or not host:
            return False
        try:
            oport = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return False
        name, _ = split_host(host)
        oname = parts.hostname.lower()
        same_name = oname == name or (is_loopback_host(oname) and is_loopback_host(name))
        return same_name and oport == self.port

    @staticmethod
    def token_ok(supplied: str, token: str) -> bool:
        return bool(token) and hmac.compare_digest(supplied.encode(), token.encode())
