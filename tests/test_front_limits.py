"""Issue 14 on the front: descriptors, Host on every route, wide binds, log escaping and throttling, the token,
requests in flight. Each test reproduces the finding against a real gateway process."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import resource
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from supervisor import log
from tests.client import Client
from tests.conftest import BIN, gateway_binary, run, wait_for


def _nofile(soft: int, hard: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


def _get(gw, path: str, host: str | None = None, headers: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{gw.port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


# -- 1: descriptor exhaustion ------------------------------------------------------------------------
def test_idle_connections_under_a_low_descriptor_limit_leave_the_gateway_serving(gateway_factory):
    """The finding: soft RLIMIT_NOFILE 44, 20 TCP connections that never send a byte, then one session.create.
    Before, the accept loop hit EMFILE and libzmq aborted the gateway and every worker with it."""
    gw = gateway_factory("--max-workers", "4", "--handshake-timeout", "2", preexec=_nofile(44, 44))
    idle = []
    try:
        for _ in range(20):
            idle.append(socket.create_connection(("127.0.0.1", gw.port), timeout=5))

        async def go():
            c = await Client.open(gw.url, open_timeout=10)
            sid = await c.create()
            reply = await c.turn(sid, "still here")
            await c.close()
            return reply

        assert "still here" in json.dumps(run(go()))
        ps = subprocess.run([str(BIN / "hermes-ps"), "--runtime-dir", str(gw.runtime_dir), "-a"],
                            capture_output=True, text=True, timeout=30)
        assert ps.returncode == 0, ps.stderr
        assert gw.proc.poll() is None, gw.log()
        # unfinished handshakes are dropped after --handshake-timeout (not 10 s or never)
        t0 = time.monotonic()
        for s in idle:
            s.settimeout(6)
            assert s.recv(1) == b"", "an idle connection got data"
        assert time.monotonic() - t0 < 5
    finally:
        for s in idle:
            s.close()
    assert "Too many open files" not in gw.log(), gw.log()
    assert gw.proc.poll() is None


def test_soft_descriptor_limit_is_raised_to_the_hard_one_and_logged(gateway_factory):
    gw = gateway_factory(preexec=_nofile(256, 512))
    soft, hard = (int(x) for x in Path(f"/proc/{gw.pid}/limits").read_text().split("Max open files")[1].split()[:2])
    assert (soft, hard) == (512, 512)
    line = next(ln for ln in gw.log().splitlines() if "descriptor limit" in ln)
    assert "soft_was=256" in line and "soft=512" in line and "hard=512" in line


def test_clients_past_max_clients_get_503_naming_the_limit(gateway_factory):
    gw = gateway_factory("--max-clients", "2")

    async def go():
        import websockets

        a, b = await Client.open(gw.url), await Client.open(gw.url)
        with pytest.raises(websockets.InvalidStatus) as info:
            await Client.open(gw.url)
        assert info.value.response.status_code == 503
        assert b"--max-clients" in info.value.response.body
        await a.close()
        await asyncio.sleep(0.2)
        c = await Client.open(gw.url)
        assert await c.call("gateway.ping") == {"ok": True}
        await b.close()
        await c.close()

    run(go())


def test_a_flood_of_unfinished_handshakes_does_not_keep_a_client_out(gateway_factory):
    gw = gateway_factory("--max-handshakes", "4", "--handshake-timeout", "10")
    idle = [socket.create_connection(("127.0.0.1", gw.port), timeout=5) for _ in range(30)]
    try:
        async def go():
            t0 = time.monotonic()
            c = await Client.open(gw.url, open_timeout=15)
            assert await c.call("gateway.ping") == {"ok": True}
            await c.close()
            return time.monotonic() - t0

        took = run(go())
        assert took < 9, f"the client waited {took:.1f}s behind 30 idle connections"
    finally:
        for s in idle:
            s.close()
    assert gw.proc.poll() is None


# -- 7: /metrics checks Host like the WebSocket ------------------------------------------------------
def test_metrics_refuses_a_foreign_host_even_with_loopback_auth(gateway_factory):
    gw = gateway_factory("--metrics-auth", "loopback")
    assert _get(gw, "/metrics")[0] == 200
    status, body = _get(gw, "/metrics", host=f"evil.example:{gw.port}")
    assert status == 403 and "Host" in body
    assert "hermes_gateway" not in body


# -- 9: wide binds -------------------------------------------------------------------------------------
def _run_gateway(tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([gateway_binary(), "run", "--port", "0", "--runtime-dir", str(tmp / "run"),
                           "--data-dir", str(tmp / "data"), *flags], capture_output=True, text=True, timeout=30)


def test_wide_bind_without_the_flag_or_tls_exits_2_with_the_reason(tmp_dirs):
    done = _run_gateway(tmp_dirs, "--host", "0.0.0.0")
    assert done.returncode == 2 and "--allow-remote" in done.stderr, done.stderr
    done = _run_gateway(tmp_dirs, "--host", "::", "--allow-remote", "1")
    assert done.returncode == 2 and "TLS" in done.stderr, done.stderr
    assert not (tmp_dirs / "run" / "gateway.json").exists()


def test_wide_bind_with_tls_serves_wss_and_checks_host_names(gateway_factory, tmp_dirs):
    cert, key = tmp_dirs / "c.pem", tmp_dirs / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=gw",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    gw = gateway_factory("--host", "0.0.0.0", "--allow-remote", "1", "--tls-cert", str(cert), "--tls-key",
                         str(key), "--allowed-hosts", "gw.example")
    assert gw.info["url"].startswith("wss://")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    async def go(host: str):
        sock = socket.create_connection(("127.0.0.1", gw.port))
        c = await Client.open(f"wss://{host}:{gw.port}/api/ws?token={gw.token}", ssl=ctx, sock=sock,
                              server_hostname="gw")
        assert await c.call("gateway.ping") == {"ok": True}
        await c.close()

    run(go("gw.example"))
    run(go(socket.gethostname()))
    import websockets
    with pytest.raises(websockets.InvalidStatus) as info:
        run(go("evil.example"))
    assert info.value.response.status_code == 403


# -- 10: logs --------------------------------------------------------------------------------------------
def test_a_value_with_a_newline_cannot_forge_a_log_line():
    """Old log.py quoted only values with a space: a newline plus tabs wrote a second, forged line."""
    formatter = log._Formatter("text")
    for value in ("nope\n2026-01-01T00:00:00.000\terror\tforged=1", "a=b", 'say"hi"', "\x1b[31mred", "x\ry",
                  "line\u2028sep"):
        record = logging.LogRecord("hermes.gateway", logging.WARNING, __file__, 1, "request refused", None, None)
        record.fields = {"method": value, "next": "ok"}
        line = formatter.format(record)
        assert "\n" not in line and "\r" not in line and "\u2028" not in line and "\x1b" not in line, line
        assert line.endswith(" next=ok") and f"method={json.dumps(value)}" in line, line


def test_a_refused_path_with_a_newline_is_logged_on_one_line(gateway_factory):
    gw = gateway_factory()
    status, _ = _get(gw, "/api/ws%0a2026-01-01T00:00:00.000%09error%09forged=1", host="evil.example")
    assert status == 403
    wait_for(lambda: "request refused" in gw.log(), 5, what="the refusal line")
    assert not any(ln.startswith("2026-01-01T00:00:00.000") for ln in gw.log().splitlines()), gw.log()


def test_bad_token_floods_are_throttled_and_a_plain_get_logs_no_traceback(gateway_factory):
    gw = gateway_factory()
    for _ in range(200):
        _get(gw, "/api/ws?token=wrong", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                 "Sec-WebSocket-Version": "13",
                                                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    status, body = _get(gw, "/api/ws?token=" + gw.token)
    assert status in (400, 426), (status, body)
    time.sleep(0.3)
    log = gw.log()
    refusals = [ln for ln in log.splitlines() if "refused" in ln or "bad token" in ln]
    assert 1 <= len(refusals) <= 12, f"{len(refusals)} lines for 200 bad tokens"
    assert "Traceback" not in log


# -- 11: the token -------------------------------------------------------------------------------------
def test_token_stays_out_of_logs_banner_and_worker_environments(gateway_factory, tmp_dirs):
    token = "t0ken-from-env-" + "x" * 20
    gw = gateway_factory(env={"HERMES_GATEWAY_TOKEN": token})
    assert gw.token == token
    assert token not in gw.log(), "the token is in the gateway's output"
    assert "token file" in gw.log()
    for pid in [gw.pid, *gw.workers()]:
        env = Path(f"/proc/{pid}/environ").read_bytes()
        if pid != gw.pid:
            assert b"HERMES_GATEWAY_TOKEN" not in env, f"worker {pid} inherited the token"


def test_token_file_is_read(gateway_factory, tmp_dirs):
    path = tmp_dirs / "tok"
    path.write_text("file-token-0123456789abcdef\n")
    path.chmod(0o600)
    gw = gateway_factory("--token-file", str(path))
    assert gw.token == "file-token-0123456789abcdef"

    async def go():
        c = await Client.open(gw.url)
        assert await c.call("gateway.ping") == {"ok": True}
        await c.close()

    run(go())


# -- 4 (front side): requests in flight per connection ----------------------------------------------------
def test_requests_in_flight_are_capped_per_connection_and_the_connection_stays_usable(gateway_factory):
    gw = gateway_factory("--max-inflight", "8", "--slash-timeout", "30")

    async def go():
        c = await Client.open(gw.url)
        sid = await c.create()
        calls = [c.request("slash.exec", {"session_id": sid, "command": "/sleep 0.3"}, timeout=40)
                 for _ in range(20)]
        await asyncio.sleep(0)
        answers = await asyncio.gather(*calls)
        refused = [a for a in answers if "error" in a and a["error"]["code"] == 4029]
        assert len(refused) >= 12, answers
        assert "--max-inflight" in refused[0]["error"]["message"]
        assert await c.call("gateway.ping") == {"ok": True}  # still usable
        await c.close()

    run(go(), timeout=60)
