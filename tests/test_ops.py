"""Issue 5 acceptance: hermes-ps, the control endpoint, sd_notify, drain, single instance, service files, /metrics."""

from __future__ import annotations

import asyncio
import json
import os
import plistlib
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.client import Client, RpcFailed
from tests.conftest import BIN, pid_alive, run, wait_for

COLUMNS = ["SESSION", "PID", "STATE", "ATTACHED", "DETACHED_FOR", "IDLE", "CPU%", "RSS", "THREADS", "FDS", "UPTIME"]


def ps(gw_or_dir, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    root = gw_or_dir.runtime_dir if hasattr(gw_or_dir, "runtime_dir") else gw_or_dir
    return subprocess.run([str(BIN / "hermes-ps"), "--runtime-dir", str(root), *args], capture_output=True,
                          text=True, timeout=timeout)


def ps_json(gw, *args: str) -> dict:
    out = ps(gw, "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def scrape(gw, token: str | None = None, bearer: str | None = None) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{gw.port}/metrics" + (f"?token={token}" if token else "")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {bearer}"} if bearer else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def pid_of(gw, sid: str) -> int:
    return next(pid for pid, title in gw.session_workers().items() if f"session={sid}" in title)


# -- 1 + 6: hermes-ps and /metrics agree about three sessions, one detached ---------------
def test_ps_and_metrics_show_three_sessions_one_detached(gateway_factory):
    gw = gateway_factory()

    async def setup():
        a = await Client.open(gw.url)
        b = await Client.open(gw.url)
        s1, s2 = await a.create(), await a.create()
        s3 = await b.create()
        await a.turn(s1, "warm up the counters")
        await b.close()  # s3 is detached now; reap_grace (120 s) keeps its worker
        return a, [s1, s2, s3]

    async def body():
        a, sids = await setup()
        wait_for(lambda: len(gw.session_workers()) == 3, 10, what="3 session workers")
        pids = {sid: pid_of(gw, sid) for sid in sids}

        def settled():
            doc = ps_json(gw)
            return doc if doc["gateway"]["counts"]["detached"] == 1 and all(
                r["state"] == "idle" for r in doc["workers"]) else None

        doc = await asyncio.to_thread(wait_for, settled, 10, 0.2, "ps to show the detach")
        rows = {r["session"]: r for r in doc["workers"]}
        assert set(rows) == set(sids), "exactly the three sessions, no lobby or spare without --all"
        for sid in sids:
            r = rows[sid]
            assert r["pid"] == pids[sid]
            assert r["kind"] == "session" and r["state"] == "idle"
            assert r["rss"] > 0 and r["uss"] > 0 and r["threads"] >= 1 and r["fds"] > 0
            assert r["key"] and r["heartbeat_age"] < 5 and r["uptime"] > 0
        assert [rows[s]["attached"] for s in sids] == [1, 1, 0]
        assert rows[sids[2]]["detached_for"] is not None and rows[sids[0]]["detached_for"] is None
        gwinfo = doc["gateway"]
        assert gwinfo["pid"] == gw.pid and gwinfo["counts"]["sessions"] == 3 and gwinfo["accepting"] is True

        # the table: a header line, then the columns
        table = await asyncio.to_thread(ps, gw)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert f"pid {gw.pid}" in lines[0] and "3 sessions (2 attached, 1 detached)" in lines[0]
        assert lines[1].split() == COLUMNS
        assert {line.split()[0] for line in lines[2:]} == set(sids)
        everything = await asyncio.to_thread(ps, gw, "--all")
        firsts = [line.split()[0] for line in everything.stdout.splitlines()[2:]]
        assert "(lobby)" in firsts and "(spare)" in firsts
        quiet = await asyncio.to_thread(ps, gw, "-q")
        assert sorted(quiet.stdout.split()) == sorted(sids)
        by_rss = await asyncio.to_thread(ps_json, gw, "--all", "--sort", "rss")
        rss = [r["rss"] for r in by_rss["workers"]]
        assert rss == sorted(rss, reverse=True) and len(rss) == 5

        # the process title counts sessions
        assert " ".join(psutil.Process(gw.pid).cmdline()).startswith("hermes-gateway: 3 sessions")

        # /metrics: parses as Prometheus text and agrees with hermes-ps --all
        status, ctype, text = await asyncio.to_thread(scrape, gw, gw.token)
        assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
        m = samples(text)
        full = await asyncio.to_thread(ps_json, gw, "--all")
        for kind in ("session", "lobby", "spare"):
            n_ps = sum(1 for r in full["workers"] if r["kind"] == kind)
            n_metrics = sum(v for (name, labels), v in m.items()
                            if name == "hermes_gateway_workers" and dict(labels)["kind"] == kind)
            assert n_metrics == n_ps, kind
        assert m[("hermes_gateway_sessions", (("attachment", "attached"),))] == 2
        assert m[("hermes_gateway_sessions", (("attachment", "detached"),))] == 1
        assert m[("hermes_gateway_rpc_total", (("method", "session.create"), ("outcome", "ok")))] == 3
        assert m[("hermes_gateway_broker_rss_bytes", ())] > 0
        assert m[("hermes_gateway_broker_threads", ())] >= 1
        await a.close()

    run(body(), 90)


def test_metrics_auth_token_bearer_and_loopback(gateway_factory):
    gw = gateway_factory()
    assert scrape(gw)[0] == 401
    assert scrape(gw, token="wrong")[0] == 401
    assert scrape(gw, bearer=gw.token)[0] == 200
    status, _, text = scrape(gw, token=gw.token)
    assert status == 200 and "hermes_gateway_workers" in text
    open_gw = gateway_factory("--metrics-auth", "loopback", runtime_dir=gw.runtime_dir.parent / "run2",
                              data_dir=gw.runtime_dir.parent / "data2")
    assert scrape(open_gw)[0] == 200  # we connect from 127.0.0.1


def test_ps_exit_codes_when_no_gateway(tmp_dirs, gateway_factory):
    missing = ps(tmp_dirs / "nowhere")
    assert missing.returncode == 3 and str(tmp_dirs / "nowhere") in missing.stderr
    assert ps(tmp_dirs, "--sort", "bogus").returncode == 2
    assert ps(tmp_dirs, "--reason", "x").returncode == 2
    gw = gateway_factory()
    assert ps(gw).returncode == 0
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(20) == 0
    down = ps(gw)
    assert down.returncode == 3 and str(gw.runtime_dir) in down.stderr, down.stderr
    # a daemon that died without cleaning up (SIGKILL) is also "not running", not a hang
    gw2 = gateway_factory()
    os.killpg(gw2.pid, signal.SIGKILL)
    gw2.proc.wait(10)
    crashed = ps(gw2, "--timeout", "2")
    assert crashed.returncode == 3, crashed.stderr


def test_ps_json_does_not_import_the_daemon_or_psutil(gateway):
    code = ("import sys, io, contextlib\nfrom supervisor.commands import ps\n"
            f"with contextlib.redirect_stdout(io.StringIO()): rc = ps.main(['--json', '--runtime-dir', {str(gateway.runtime_dir)!r}])\n"
            "print(rc, ' '.join(sorted(sys.modules)))")
    out = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=30)
    rc, mods = out.stdout.split(" ", 1)
    assert rc == "0", out.stderr
    loaded = set(mods.split())
    for heavy in ("psutil", "prometheus_client", "supervisor.broker", "supervisor.broker.broker", "supervisor.config", "websockets", "asyncio"):
        assert heavy not in loaded, heavy


def test_ps_default_runtime_dir_is_the_gateways(tmp_dirs, monkeypatch):
    from supervisor import config
    from supervisor.commands import ps as ps_mod

    monkeypatch.delenv("HERMES_GATEWAY_RUNTIME_DIR", raising=False)
    for xdg in (str(tmp_dirs), str(tmp_dirs / "absent"), None):
        if xdg is None:
            monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        else:
            monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
        assert ps_mod.default_runtime_dir() == config._default_runtime_dir()
        assert ps_mod.default_runtime_dir() == config.load({}, environ={}).runtime_dir
    monkeypatch.setenv("HERMES_GATEWAY_RUNTIME_DIR", str(tmp_dirs / "x"))
    assert ps_mod.default_runtime_dir() == config.load({}).runtime_dir


# -- control: kill, drain, bad input --------------------------------------------------------
def test_control_kill_drain_and_garbage(gateway):
    async def body():
        c = await Client.open(gateway.url)
        sid = await c.create()
        pid = pid_of(gateway, sid)
        out = await asyncio.to_thread(ps, gateway, "--kill", sid, "--reason", "test_kill")
        assert out.returncode == 0 and str(pid) in out.stdout, out.stderr
        assert not pid_alive(pid)
        await c.wait_event(lambda e: e["type"] == "session.reclaimed" and e["payload"]["reason"] == "test_kill")
        bad = await asyncio.to_thread(ps, gateway, "--kill", "no-such-session")
        assert bad.returncode == 1 and "no live worker" in bad.stderr
        bad_reason = await asyncio.to_thread(ps, gateway, "--kill", "1", "--reason", "Bad Reason!")
        assert bad_reason.returncode == 1

        drained = await asyncio.to_thread(ps, gateway, "--drain")
        assert drained.returncode == 0 and "accepting=no" in drained.stdout
        with pytest.raises(RpcFailed) as err:
            await c.create()
        assert err.value.code == 4090
        header = (await asyncio.to_thread(ps, gateway)).stdout.splitlines()[0]
        assert "DRAINING" in header
        assert (await asyncio.to_thread(ps, gateway, "--undrain")).returncode == 0
        sid2 = await c.create()
        assert sid2

        stats = json.loads((await asyncio.to_thread(ps, gateway, "--stats")).stdout)["gateway"]
        assert stats["reaps"].get("test_kill") == 1 and stats["config"]["reap_grace"] == 120.0
        assert stats["config"]["token"] in (None, "***")
        _, _, text = await asyncio.to_thread(scrape, gateway, gateway.token)
        assert samples(text)[("hermes_gateway_reaps_total", (("reason", "test_kill"),))] == 1
        await c.close()

    run(body(), 60)
    # garbage on the control socket gets an error reply; the daemon keeps serving
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{gateway.runtime_dir}/control.sock")
    for junk in (b"\xc1\xff", msgpack.packb([1, 2]), msgpack.packb({"cmd": "launch"})):
        sock.send(junk)
        assert sock.poll(5000), "no reply to a bad request"
        reply = msgpack.unpackb(sock.recv(), raw=False)
        assert reply["ok"] is False and reply["error"]
    sock.close()
    ctx.term()
    assert ps(gateway).returncode == 0


# -- 2: sd_notify over a real datagram socket ------------------------------------------------
class NotifyListener:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.on_ready = None
        self.ready_check: bool | None = None
        self._stop = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            text = data.decode()
            if "READY=1" in text.splitlines() and self.ready_check is None and self.on_ready:
                self.ready_check = self.on_ready()
            self.messages.append((time.monotonic(), text))

    def having(self, line: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if any(x.startswith(line) for x in m.splitlines())]

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def test_sd_notify_ready_status_watchdog_reloading_stopping(tmp_dirs, gateway_factory):
    path = str(tmp_dirs / "notify.sock")
    listener = NotifyListener(path)
    config = tmp_dirs / "gw.toml"
    config.write_text("[gateway]\nreap_grace = 120\n")
    run_dir = tmp_dirs / "run"

    def port_accepts() -> bool:
        info = json.loads((run_dir / "gateway.json").read_text())
        with socket.create_connection(("127.0.0.1", info["port"]), timeout=2):
            pass
        return bool((run_dir / "control.sock").exists())

    listener.on_ready = port_accepts
    try:
        gw = gateway_factory("--config", str(config),
                             env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        wait_for(lambda: listener.having("READY=1"), 10, what="READY=1")
        assert listener.ready_check is True, "READY=1 came before the port accepted"
        # the fork server and workers must not inherit the notify socket
        for pid in list(gateway_factory_workers(gw)):
            try:
                assert "NOTIFY_SOCKET" not in psutil.Process(pid).environ()
            except psutil.AccessDenied:
                pass

        async def one_session():
            c = await Client.open(gw.url)
            await c.create()
            await asyncio.to_thread(wait_for, lambda: any("STATUS=1 sessions (1 attached" in m
                                                          for _, m in listener.messages), 10, 0.05, "STATUS")
            await c.close()

        run(one_session())
        wait_for(lambda: any("0 attached, 1 detached" in m for _, m in listener.messages), 10, what="detach STATUS")

        time.sleep(2.0)
        pings = [t for t, _ in listener.having("WATCHDOG=1")]
        assert len(pings) >= 5
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert 0.1 <= statistics.median(gaps) <= 0.4, gaps  # WATCHDOG_USEC/2 = 0.2 s

        config.write_text("[gateway]\nreap_grace = 60\n")
        n_ready = len(listener.having("READY=1"))
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(listener.having("READY=1")) > n_ready, 10, what="READY=1 after reload")
        reloading = listener.having("RELOADING=1")
        assert reloading, listener.messages
        usec = int(next(x for x in reloading[0][1].splitlines() if x.startswith("MONOTONIC_USEC="))[15:])
        assert abs(usec / 1e6 - time.monotonic()) < 30
        assert reloading[0][0] <= listener.having("READY=1")[-1][0]
        stats = json.loads(ps(gw, "--stats").stdout)["gateway"]
        assert stats["config"]["reap_grace"] == 60.0
        wait_for(lambda: "reap_grace:120.0->60.0" in gw.log(), 5, what="reload log line")

        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(20) == 0
        stopping = listener.having("STOPPING=1")
        assert stopping and stopping[0][0] > listener.having("READY=1")[0][0]
    finally:
        listener.close()


def gateway_factory_workers(gw) -> list[int]:
    return [p.pid for p in gw.descendants()]


def test_sd_notify_abstract_socket_and_no_socket():
    from supervisor.ops.sdnotify import Notifier

    name = f"hermes-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_interval == 1.5
        n.ready("hello")
        assert sock.recv(1024) == b"READY=1\nSTATUS=hello"
        n.status("hello")  # unchanged: not sent again
        n.status("two")
        assert sock.recv(1024) == b"STATUS=two"
        n.close()
    finally:
        sock.close()
    other = Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_usec == 0, "a watchdog for another pid is not ours"
    off = Notifier.from_env({})
    assert not off.enabled and off.notify("READY=1") is False


# -- 3: SIGTERM drain with three sessions mid-turn ------------------------------------------------
@pytest.mark.timeout(90)
def test_sigterm_drains_three_sessions_mid_turn(gateway_factory):
    stop_timeout = 3.0
    gw = gateway_factory("--echo-delay", "0.25", "--stop-timeout", str(stop_timeout))
    prompt = " ".join(f"word{i}" for i in range(60))
    state: dict = {}

    async def body():
        c = await Client.open(gw.url)
        keys = {}
        for _ in range(3):
            res = await c.call("session.create", {"cols": 80})
            keys[res["session_id"]] = res["stored_session_id"]
        for sid in keys:
            await c.call("prompt.submit", {"session_id": sid, "text": prompt})
        for sid in keys:
            await c.wait_event(lambda e, sid=sid: e.get("session_id") == sid and e["type"] == "message.delta"
                               and len([x for x in c.by_session[sid] if x["type"] == "message.delta"]) >= 3)
        state["pids"] = [p.pid for p in gw.descendants()]
        state["t0"] = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(c._reader, 15)
        except asyncio.TimeoutError:
            pass
        state["close_code"] = c.ws.close_code
        state["keys"] = keys
        state["deltas"] = {sid: c.deltas(sid) for sid in keys}
        state["reclaimed"] = {e["session_id"] for e in c.events if e["type"] == "session.reclaimed"}

    run(body(), 60)
    rc = gw.proc.wait(stop_timeout + 10)
    took = time.monotonic() - state["t0"]
    assert rc == 0
    assert took < stop_timeout + 1 + 1.0, f"drain took {took:.2f}s"  # +1 s of the issue, +1 s for wait/poll slack
    assert len(state["pids"]) >= 5  # zygote, lobby, spare, 3 sessions
    wait_for(lambda: not any(pid_alive(p) for p in state["pids"]), 5, what="every worker gone")
    assert state["close_code"] == 1001
    assert state["reclaimed"] == set(state["keys"]), "every client was told its session was reclaimed"
    db = sqlite3.connect(gw.data_dir / "sessions.db")
    for sid, key in state["keys"].items():
        rows = db.execute("SELECT role, text, status FROM messages WHERE session_key = ? ORDER BY id", (key,)).fetchall()
        assert rows[0] == ("user", prompt, None)
        role, text, status = rows[-1]
        assert role == "assistant" and status == "interrupted", rows
        assert text and prompt.startswith(text) and len(text) < len(prompt)
        assert text.startswith(state["deltas"][sid]), "the store has at least what the client saw"
        ended = db.execute("SELECT end_reason FROM sessions WHERE key = ?", (key,)).fetchone()
        assert ended[0] == "shutdown"
    db.close()
    log = gw.log()
    stop_lines = [line for line in log.splitlines() if "[MEMORY]" in line and "at=stop" in line]
    assert stop_lines and "workers=0" in stop_lines[0] and "rss=" in stop_lines[0]
    assert not (gw.runtime_dir / "control.sock").exists() and not (gw.runtime_dir / "gateway.json").exists()


def test_memory_line_every_interval(gateway_factory):
    gw = gateway_factory("--monitor-interval", "0.3")
    wait_for(lambda: gw.log().count("[MEMORY]") >= 3, 10, what="periodic [MEMORY] lines")
    line = next(line for line in gw.log().splitlines() if "[MEMORY]" in line)
    for key in ("rss=", "threads=", "fds=", "workers=", "attached=", "detached=", "uptime="):
        assert key in line, line
    rss_mb = float(line.split("rss=")[1].split("MB")[0])
    assert 1 < rss_mb < 2000


# -- 4: single instance ------------------------------------------------------------------------------
def test_second_daemon_on_same_runtime_dir_exits_1(gateway, tmp_dirs):
    token_before = gateway.token
    second = subprocess.run(
        [str(BIN / "hermes-gateway"), "run", "--port", "0", "--runtime-dir", str(gateway.runtime_dir),
         "--data-dir", str(tmp_dirs / "data-second")], capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert f"pid {gateway.pid}" in second.stderr, second.stderr
    assert gateway.proc.poll() is None and gateway.token == token_before
    assert not (tmp_dirs / "data-second" / "workers.json").exists()

    async def still_works():
        c = await Client.open(gateway.url)
        await c.turn(await c.create(), "still here")
        await c.close()

    run(still_works())
    assert ps_json(gateway)["gateway"]["pid"] == gateway.pid


# -- 5: service files ----------------------------------------------------------------------------------
def _install(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    return subprocess.run([str(BIN / "hermes-gateway"), "install-service", *args], capture_output=True, text=True,
                          timeout=30, env=full)


@pytest.mark.parametrize("user", [False, True])
def test_systemd_unit_passes_systemd_analyze_verify(tmp_dirs, user):
    # a system unit needs an account to run as (issue 14 item 3: never root by default)
    out = _install("--systemd", "--print", *(["--user"] if user else ["--user", "daemon"]))
    assert out.returncode == 0, out.stderr
    unit = out.stdout
    for line in ("Type=notify", "KillMode=mixed", "OOMPolicy=continue", "Restart=on-failure", "NoNewPrivileges=yes"):
        assert line in unit.splitlines()
    assert any(x.startswith("WatchdogSec=") for x in unit.splitlines())
    exec_start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split()[0] == str(BIN / "hermes-gateway")
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (apt-get install systemd provides it)")
    path = tmp_dirs / "hermes-gateway.service"
    path.write_text(unit)
    xdg = tmp_dirs / "xdg"
    xdg.mkdir(mode=0o700)
    cmd = [tool, *(["--user"] if user else []), "verify", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, XDG_RUNTIME_DIR=str(xdg)))
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


def test_systemd_unit_is_written_for_the_user(tmp_dirs):
    cfg = tmp_dirs / "gw.toml"
    cfg.write_text("[gateway]\nstop_timeout = 20\n")
    out = _install("--systemd", "--user", "--config", str(cfg), env={"XDG_CONFIG_HOME": str(tmp_dirs / "cfg")})
    assert out.returncode == 0, out.stderr
    unit = (tmp_dirs / "cfg" / "systemd" / "user" / "hermes-gateway.service").read_text()
    assert f"--config {cfg}" in unit and "TimeoutStopSec=30" in unit
    assert "systemctl --user" in out.stdout
    assert _install("--systemd", "--print", "--config", str(tmp_dirs / "missing.toml")).returncode == 2


def test_launchd_plist_round_trips():
    out = _install("--launchd", "--print")
    assert out.returncode == 0, out.stderr
    doc = plistlib.loads(out.stdout.encode())
    assert plistlib.loads(plistlib.dumps(doc)) == doc
    assert doc["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(doc["ThrottleInterval"], int) and doc["ThrottleInterval"] > 0
    assert doc["ProgramArguments"][:2] == [str(BIN / "hermes-gateway"), "run"]
    assert Path(doc["ProgramArguments"][0]).exists()
    assert doc["StandardErrorPath"].endswith(".log") and doc["StandardOutPath"].endswith(".log")
    assert doc["Label"] and doc["RunAtLoad"] is True
    assert doc["ExitTimeOut"] > 5  # room for the drain (stop_timeout 5 s by default)


@pytest.mark.timeout(90)
def test_sigterm_with_unresponsive_clients_still_exits_in_time(gateway_factory, tmp_dirs):
    """Clients that never answer the closing handshake (a frozen laptop) must not stretch the drain."""
    stop_timeout = 2.0
    gw = gateway_factory("--stop-timeout", str(stop_timeout))
    script = tmp_dirs / "frozen.py"
    script.write_text(
        "import asyncio, sys\nsys.path.insert(0, %r)\nfrom tests.client import Client\n"
        "async def go():\n    cs = [await Client.open(%r) for _ in range(5)]\n"
        "    for c in cs: await c.create()\n    print('ready', flush=True)\n    await asyncio.sleep(600)\n"
        "asyncio.run(go())\n" % (str(Path(__file__).resolve().parent.parent), gw.url))
    frozen = subprocess.Popen([str(BIN / "python"), str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert frozen.stdout.readline().strip() == "ready"
        frozen.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(30) == 0
        took = time.monotonic() - t0
        assert took < stop_timeout + 1 + 1.0, f"drain took {took:.2f}s with 5 frozen clients"
    finally:
        frozen.kill()
        frozen.wait(10)
