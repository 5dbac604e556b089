"""Issue 13 item 3, CPU per turn: Hermes' provider TLS context is built once per CA bundle, not per request.

Against a real HTTPS server on loopback with a certificate made here: the clients of two
requests share one context and both connect; a replaced bundle gives a new context (the
old server's certificate is then refused); a broken bundle fails every time.
"""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

pytest.importorskip("agent.ssl_verify")
import httpx  # noqa: E402
from agent import ssl_verify  # noqa: E402

from worker.hermes import tls_context  # noqa: E402

OPENSSL = shutil.which("openssl")


def _cert(tmp: Path, name: str) -> tuple[Path, Path]:
    key, cert = tmp / f"{name}.key", tmp / f"{name}.pem"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def https(tmp_path):
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    cert, key = _cert(tmp_path, "server")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/", cert
    server.shutdown()
    server.server_close()


@pytest.fixture
def installed(monkeypatch):
    """install() on Hermes' module, undone after the test (monkeypatch restores both names)."""
    monkeypatch.setattr(ssl_verify, "ssl", ssl_verify.ssl)
    monkeypatch.setattr(ssl_verify, "resolve_httpx_verify", ssl_verify.resolve_httpx_verify)
    monkeypatch.setattr(tls_context, "_contexts", {})
    for name in ("HERMES_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    assert tls_context.install()
    return monkeypatch


def _get(url: str, verify) -> str:
    with httpx.Client(verify=verify, trust_env=False) as client:
        return client.get(url).text


def test_requests_share_one_context_per_bundle_and_a_new_bundle_is_loaded_again(installed, https, tmp_path):
    url, cert = https
    bundle = tmp_path / "bundle.pem"
    shutil.copy(cert, bundle)
    installed.setenv("HERMES_CA_BUNDLE", str(bundle))
    first = ssl_verify.resolve_httpx_verify()
    second = ssl_verify.resolve_httpx_verify(base_url=url)
    assert isinstance(first, ssl.SSLContext) and second is first  # loaded once
    assert _get(url, first) == "ok" and _get(url, second) == "ok"  # and every client connects with it
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname

    other, _ = _cert(tmp_path, "other")
    shutil.copy(other, bundle)  # replaced: a different CA
    third = ssl_verify.resolve_httpx_verify()
    assert third is not first
    with pytest.raises(httpx.ConnectError):  # the new bundle is what is used: the server is no longer trusted
        _get(url, third)

    bundle.write_text("not a certificate\n")
    for _ in range(2):  # a failure is never kept
        with pytest.raises(ssl.SSLError):
            ssl_verify.resolve_httpx_verify()


def test_without_a_bundle_the_clients_share_httpx_own_default_context(installed):
    first = ssl_verify.resolve_httpx_verify()
    assert isinstance(first, ssl.SSLContext) and ssl_verify.resolve_httpx_verify() is first
    own = httpx.create_ssl_context(verify=True)  # what httpx builds for verify=True, per client
    assert first.cert_store_stats() == own.cert_store_stats() and first.verify_mode == own.verify_mode
    assert ssl_verify.resolve_httpx_verify(ssl_verify=False) is False  # verification off stays off
