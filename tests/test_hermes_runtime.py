"""Issue 7, the `hermes` runtime: the real Hermes session code (AIAgent, slash worker) in gateway workers.

One gateway (module scope) with `--runtime hermes`, its agent pointed at the fake
OpenAI-compatible server in this process. Skips, saying why, when hermes-agent is
not installed (`make test` installs the `hermes` extra).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import sqlite3
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.client import Client, RpcFailed
from tests.conftest import kill_tree, pid_alive, run, start_gateway, wait_for
from tests.fake_openai import FakeOpenAI, split_tokens

if importlib.util.find_spec("tui_gateway") is None:
    pytest.skip("hermes-agent is not installed (pip install -e '.[hermes]'; make test does it)",
                allow_module_level=True)

REPLY = "Hello from the fake model, through the real Hermes agent."
REAP_GRACE = 1.0
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI(reply=REPLY, delay=0.005) as server:
        yield server


@pytest.fixture(scope="module")
def gw(fake):
    tmp = Path(tempfile.mkdtemp(prefix="hg-", dir="/tmp"))
    g = start_gateway(tmp, "--runtime", "hermes", "--openai-base-url", fake.base_url, "--openai-model", "fake-model",
                      "--reap-grace", str(REAP_GRACE), "--list-grace", "0.5")
    yield g
    kill_tree(g)
    shutil.rmtree(tmp, ignore_errors=True)


def hermes_children(worker_pid: int) -> list[psutil.Process]:
    """The Hermes slash workers of a worker: its descendants, and the ones the fork server forked into its group."""
    try:
        kids = psutil.Process(worker_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in psutil.process_iter():
        try:
            if p.pid != worker_pid and os.getpgid(p.pid) == worker_pid and p not in kids:
                kids.append(p)
        except (psutil.Error, OSError):
            pass
    out = []
    for p in kids:
        try:
            if "tui_gateway.slash_worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def worker_of(gw, sid: str) -> int:
    return wait_for(lambda: next((pid for pid, t in gw.session_workers().items() if f"session={sid}" in t), None),
                    10, what=f"the worker of {sid}")


def gone(pid: int) -> bool:
    return not pid_alive(pid)


def test_fork_server_preloads_hermes_without_threads_and_home_is_isolated(gw, fake):
    zygote = next(p for p in gw.descendants() if "hermes-zygote" in " ".join(p.cmdline()))
    # Hermes starts two threads at import; a fork server with threads would fork them half-copied
    assert zygote.num_threads() == 1
    home = gw.data_dir / "hermes-home"
    config = (home / "config.yaml").read_text()
    assert fake.base_url in config and "fake-model" in config and "provider: custom" in config
    assert oct(home.stat().st_mode & 0o777) == "0o700"
    assert oct((home / "config.yaml").stat().st_mode & 0o777) == "0o600"


def test_fork_server_built_an_agent_and_kept_nothing_of_it_open(gw):
    """The fork server builds and drops one agent before it forks (its lazily made state is then shared): no
    thread, no database handle and no network socket of that build may stay in it for a child to inherit."""
    zygote = next(p for p in gw.descendants() if "hermes-zygote" in " ".join(p.cmdline()))
    assert zygote.num_threads() == 1
    assert not [f.path for f in zygote.open_files() if "state.db" in f.path]
    assert not zygote.net_connections(kind="inet")
    assert "fork server built an agent in" in gw.log() and "rehearsing an agent build failed" not in gw.log()


def test_lobby_serves_global_methods_through_hermes(gw):
    async def go():
        c = await Client.open(gw.url)
        try:
            assert (await c.call("setup.status"))["provider_configured"] is True
            catalog = await c.call("commands.catalog")
            assert any(cmd == "/help" for cmd, _ in catalog["pairs"]) and catalog["categories"]
            full = await c.call("config.get", {"key": "full"})
            assert full["config"]["model"]["default"] == "fake-model"
            assert (await c.call("pet.cells", {"state": "idle"})) == {"enabled": False}
            with pytest.raises(RpcFailed) as info:
                await c.call("no.such.method")
            assert info.value.code == -32601
        finally:
            await c.close()

    run(go(), 30)


def test_prompt_streams_through_the_real_agent_and_slash_worker_is_in_the_group(gw, fake):
    async def go():
        c = await Client.open(gw.url)
        created = await c.call("session.create", {"cols": 100}, timeout=20)
        sid, key = created["session_id"], created["stored_session_id"]
        pid = worker_of(gw, sid)
        before = len(fake.requests)
        done = await c.turn(sid, "say hello", timeout=60)
        assert done["payload"]["status"] == "complete" and done["payload"]["text"] == REPLY
        deltas = [e["payload"]["text"] for e in c.by_session[sid] if e["type"] == "message.delta"]
        assert "".join(deltas) == REPLY and len(deltas) == len(split_tokens(REPLY))  # streamed, chunk by chunk
        streamed = [r for r in fake.requests[before:] if r.body.get("stream")]
        assert streamed and any("say hello" in str(m.get("content")) for m in streamed[0].messages)
        seqs = [e["seq"] for e in c.by_session[sid]]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # the worker numbers Hermes' events
        assert "message.start" in [e["type"] for e in c.by_session[sid]]
        assert hermes_children(pid) == []  # the slash worker starts with the first slash command, not the session

        out = await c.call("slash.exec", {"session_id": sid, "command": "help"}, timeout=60)
        assert "/help" in out["output"] and "Available Commands" in out["output"]
        slash = hermes_children(pid)
        assert slash and all(os.getpgid(p.pid) == pid for p in slash)  # in the worker's group: its kill takes them

        # the reaper sees the session idle again (state comes from Hermes' own turn flags)
        async def row() -> dict:
            rows = (await c.call("session.active_list", {"current_session_id": sid}))["sessions"]
            return next(r for r in rows if r["id"] == sid)

        deadline = time.monotonic() + 10
        while (r := await row())["status"] != "idle" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert r["status"] == "idle" and r["session_key"] == key and r["message_count"] >= 2
        assert r["preview"] == "say hello"
        with pytest.raises(RpcFailed) as info:  # a method Hermes does not have: -32601 from the session's worker
            await c.call("no.such.method", {"session_id": sid})
        assert info.value.code == -32601
        # the TUI's reconnect resumes by *runtime* id: the live session is re-attached, not a new one started
        again = await c.call("session.resume", {"session_id": sid, "cols": 80}, timeout=20)
        assert again["session_id"] == sid and again["message_count"] >= 2
        assert list(gw.session_workers()) == [pid]

        c.abort()  # the client goes away without a word: detach, then reap after reap_grace
        return pid, [p.pid for p in slash], key

    pid, slash_pids, key = run(go(), 80)
    wait_for(lambda: gone(pid) and all(map(gone, slash_pids)), 15,
             what="the reaped worker and its slash worker to exit")
    assert not gw.session_workers()
    wait_for(lambda: "reason=ws_orphan_reap" in gw.log(), 5, what="the reap in the log")
    # finalize let Hermes close its session: the row in Hermes' own database says when and why
    with sqlite3.connect(f"file:{gw.data_dir / 'hermes-home' / 'state.db'}?mode=ro", uri=True) as db:
        ended_at, reason = db.execute("SELECT ended_at, end_reason FROM sessions WHERE id = ?", (key,)).fetchone()
    assert ended_at and reason == "ws_orphan_reap"

    async def resumed():
        c = await Client.open(gw.url)
        try:
            listed = await c.call("session.list", {"limit": 10})
            assert key in [s["id"] for s in listed["sessions"]]
            res = await c.call("session.resume", {"session_id": key, "cols": 80}, timeout=30)
            assert res["resumed"] == key
            assert [m["text"] for m in res["messages"] if m["role"] == "assistant"] == [REPLY]
            await c.call("session.close", {"session_id": res["session_id"]})
        finally:
            await c.close()

    run(resumed(), 40)


def test_a_dropped_connection_reattaches_a_session_that_ran_no_turn_yet(gw):
    """A refresh before the first prompt: the TUI resumes by runtime id, and Hermes has no row for the session
    yet (it writes it at the first turn); the live session in its worker answers, the same worker, no new one."""

    async def go():
        c = await Client.open(gw.url)
        created = await c.call("session.create", {"cols": 80}, timeout=30)
        sid, key = created["session_id"], created.get("session_key") or created.get("stored_session_id")
        pid = worker_of(gw, sid)
        c.abort()
        c2 = await Client.open(gw.url)
        try:
            res = await c2.call("session.resume", {"session_id": sid, "cols": 80}, timeout=30)
            assert res["session_id"] == sid and res["resumed"] == key and res["message_count"] == 0
            assert worker_of(gw, sid) == pid
            done = await c2.turn(sid, "first words after the refresh", timeout=60)
            assert done["payload"]["text"] == REPLY
            await c2.call("session.close", {"session_id": sid})
        finally:
            await c2.close()

    run(go(), 60)


def test_killed_worker_takes_its_slash_worker_with_it(gw):
    """A worker that dies without finalizing: the broker's group kill still reclaims Hermes' subprocess."""

    async def go():
        c = await Client.open(gw.url)
        created = await c.call("session.create", {"cols": 80}, timeout=20)
        sid, key = created["session_id"], created["stored_session_id"]
        pid = worker_of(gw, sid)
        await c.turn(sid, "hello", timeout=60)  # Hermes writes its session row on the first prompt
        await c.call("slash.exec", {"session_id": sid, "command": "help"}, timeout=60)
        # Hermes may start two: a slash.exec that beats the agent build starts one, the build another, and
        # the first is dropped without being closed (in Hermes' own gateway it lives until the gateway exits)
        slash = hermes_children(pid)
        assert slash and all(os.getpgid(p.pid) == pid for p in slash)
        os.kill(pid, signal.SIGKILL)  # the worker only, not its group
        reclaimed = await c.wait_event(lambda e: e["type"] == "session.reclaimed" and e.get("session_id") == sid, 15)
        assert reclaimed["payload"]["reason"] == "worker_exit"
        await c.close()
        return pid, [p.pid for p in slash], key

    pid, slash_pids, key = run(go(), 80)
    wait_for(lambda: gone(pid) and all(map(gone, slash_pids)), 10,
             what="the slash workers to die with their worker's group")

    def end_reason() -> str | None:  # the dead worker could not end its row: the lobby does
        with sqlite3.connect(f"file:{gw.data_dir / 'hermes-home' / 'state.db'}?mode=ro", uri=True) as db:
            row = db.execute("SELECT end_reason FROM sessions WHERE id = ?", (key,)).fetchone()
        return row[0] if row else None

    assert wait_for(end_reason, 10, what="the lobby to end the killed session's row") == "worker_exit"


def test_workers_reuse_the_tool_definitions_the_fork_server_probed(gw):
    """Hermes probes ~30 tools' availability once per process and caches the result; the fork server did it, so a
    worker's agent build probes nothing (a probe logs 'check_fn ...' / 'Vision auto-detect' to agent.log)."""

    async def go():
        c = await Client.open(gw.url)
        try:
            sid = (await c.call("session.create", {"cols": 80}, timeout=20))["session_id"]
            await c.turn(sid, "hello", timeout=60)
            await c.call("session.close", {"session_id": sid}, timeout=20)
        finally:
            await c.close()

    run(go(), 80)
    log = gw.data_dir / "hermes-home" / "logs" / "agent.log"
    text = wait_for(lambda: log.exists() and "OpenAI client created" in (t := log.read_text(errors="replace")) and t,
                    10, what="the worker's agent to log to agent.log")
    assert "check_fn" not in text and "Vision auto-detect" not in text


def test_home_config_keeps_what_is_not_the_gateways(tmp_dirs):
    """Only `model:` is the gateway's: the TUI's config.set and `hermes setup` keep the rest; a key file others
    can read is refused; an unchanged config is not rewritten (the TUI polls its mtime)."""
    import yaml

    from worker.hermes.home import HermesHomeError, prepare

    key = tmp_dirs / "key"
    key.write_text("sk-secret\n")
    key.chmod(0o644)
    cfg = {"data_dir": str(tmp_dirs), "openai_base_url": "http://127.0.0.1:1/v1", "openai_model": "m1",
           "openai_api_key_file": str(key)}
    with pytest.raises(HermesHomeError, match="readable by others"):
        prepare(cfg)
    key.chmod(0o600)
    home = Path(prepare(cfg)["HERMES_HOME"])
    path = home / "config.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["model"] == {"provider": "custom", "default": "m1", "base_url": "http://127.0.0.1:1/v1",
                             "api_key": "sk-secret"}
    data["display"] = {"busy_input_mode": "queue"}  # what the TUI's config.set writes
    data["model"]["context_length"] = 4096
    path.write_text(yaml.safe_dump(data))
    mtime = path.stat().st_mtime_ns
    prepare(cfg)
    assert path.stat().st_mtime_ns == mtime  # nothing of ours changed: not rewritten
    prepare(dict(cfg, openai_model="m2", openai_base_url="", openai_api_key_file="", hermes_provider="openrouter"))
    data = yaml.safe_load(path.read_text())
    assert data["display"] == {"busy_input_mode": "queue"}
    assert data["model"] == {"provider": "openrouter", "default": "m2", "context_length": 4096}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_the_api_key_reaches_the_provider_but_never_a_client(tmp_dirs):
    """Issue 14 item 12: --openai-api-key-file goes into hermes-home/config.yaml (Hermes reads it from there),
    and Hermes' config.get {key: "full"} returns that file: the worker masks it in everything it sends."""
    import json

    secret = "sk-test-hermes-9f3c2e1d7a6b5c4d"
    key = tmp_dirs / "key"
    key.write_text(secret + "\n")
    key.chmod(0o600)
    with FakeOpenAI(reply=REPLY, api_key=secret) as server:  # answers 401 unless the key is sent
        g = start_gateway(tmp_dirs, "--runtime", "hermes", "--openai-base-url", server.base_url,
                          "--openai-model", "fake-model", "--openai-api-key-file", str(key))
        try:
            async def go():
                c = await Client.open(g.url)
                try:
                    full = await c.call("config.get", {"key": "full"})
                    assert full["config"]["model"]["api_key"] == "***"
                    assert full["config"]["model"]["default"] == "fake-model"
                    created = await c.call("session.create", {"cols": 100}, timeout=20)
                    sid = created["session_id"]
                    in_session = await c.call("config.get", {"session_id": sid, "key": "full"})
                    done = await c.turn(sid, "hello", timeout=40)
                    assert done["payload"].get("status", "complete") == "complete", done
                    seen = json.dumps([full, created, in_session, c.events])
                    assert secret not in seen and REPLY.split()[0] in seen
                finally:
                    await c.close()

            run(go(), 80)
            assert server.requests and server.last().headers.get("authorization") == f"Bearer {secret}"
        finally:
            kill_tree(g)
