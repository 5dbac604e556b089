"""Issue 2 acceptance 5 and the command line: the installed `hermes-gateway` binary, its files and its settings."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from protocol import __version__
from tests.client import Client
from tests.conftest import BIN, Gateway, gateway_binary, kill_tree, run, start_gateway, wait_for

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_GATEWAY_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([gateway_binary(), *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else clean_env())


def assert_usage_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, exactly one line on stderr, nothing on stdout, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    assert proc.stdout == ""
    line = lines[0]
    assert line.startswith("hermes-gateway") and "error" in line
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.fixture
def stopper():
    """Gateways started by a test are stopped (whole tree) at teardown even if the test fails."""
    live: list[Gateway] = []
    yield live
    for gw in live:
        kill_tree(gw)


# -- gateway.json, token file, modes ----------------------------------------------
def test_port_zero_writes_gateway_json_and_a_private_token(gateway):
    info = json.loads((gateway.runtime_dir / "gateway.json").read_text())
    for key in ("pid", "host", "port", "url", "token_file", "started_at", "version"):
        assert key in info, key
    assert info["pid"] == gateway.pid
    assert info["host"] == "127.0.0.1"
    assert isinstance(info["port"], int) and 0 < info["port"] < 65536
    assert info["version"] == __version__
    assert abs(time.time() - info["started_at"]) < 120
    token_file = Path(info["token_file"])
    assert token_file == gateway.runtime_dir / "token"
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert info["url"] == f"ws://127.0.0.1:{info['port']}/api/ws?token={token}"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(gateway.runtime_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((gateway.runtime_dir / "gateway.json").stat().st_mode) == 0o600

    async def go():
        c = await Client.open(info["url"])  # the URL in the file is the one that works
        assert await c.call("gateway.ping") == {"ok": True}
        await c.close()

    run(go())


def test_runtime_dir_is_made_private_even_if_it_existed_open(gateway_factory, tmp_dirs):
    rd = tmp_dirs / "open-run"
    rd.mkdir(mode=0o755)
    os.chmod(rd, 0o755)
    gateway_factory(runtime_dir=rd)
    assert stat.S_IMODE(rd.stat().st_mode) == 0o700


def test_each_start_generates_a_new_token(tmp_dirs, stopper):
    tokens = []
    for i in range(2):
        gw = start_gateway(tmp_dirs, runtime_dir=tmp_dirs / f"r{i}", data_dir=tmp_dirs / f"d{i}")
        stopper.append(gw)
        tokens.append(gw.token)
        kill_tree(gw)
    assert tokens[0] != tokens[1]


def test_token_flag_env_and_precedence(tmp_dirs, stopper):
    cases = [
        ([], {"HERMES_GATEWAY_TOKEN": "token-from-env-0123456789"}, "token-from-env-0123456789"),
        (["--token", "token-from-flag-0123456789"], {"HERMES_GATEWAY_TOKEN": "token-from-env-0123456789"},
         "token-from-flag-0123456789"),
    ]
    for i, (flags, env, want) in enumerate(cases):
        gw = start_gateway(tmp_dirs, *flags, env=env, runtime_dir=tmp_dirs / f"r{i}", data_dir=tmp_dirs / f"d{i}")
        stopper.append(gw)
        assert gw.token == want
        assert gw.info["url"].endswith(f"?token={want}")
        assert stat.S_IMODE((gw.runtime_dir / "token").stat().st_mode) == 0o600

        async def go():
            c = await Client.open(f"ws://127.0.0.1:{gw.port}/api/ws?token={want}")
            assert await c.call("gateway.ping") == {"ok": True}
            await c.close()

        run(go())
        kill_tree(gw)


# -- precedence: flag > env > file > default, observed through --max-batch ----------
def effective_max_batch(gw: Gateway) -> int:
    """The batch bound in force, read from the gateway's own answer: a batch over it is refused with its value."""

    async def go() -> int:
        async with connect(gw.url, max_size=None) as ws:
            assert json.loads(await ws.recv())["params"]["type"] == "gateway.ready"
            for n in (10, 20, 30, 40, 64):
                await ws.send(json.dumps([{"jsonrpc": "2.0", "id": i, "method": "gateway.ping"}
                                          for i in range(n + 1)]))
                resp = json.loads(await ws.recv())
                if isinstance(resp, dict):  # refused: "batch of N+1 exceeds <bound>"
                    assert resp["error"]["code"] == -32600, resp
                    return int(resp["error"]["message"].rsplit(" ", 1)[-1])
                assert len(resp) == n + 1
        raise AssertionError("no batch was refused")

    return run(go())


def test_precedence_flag_over_env_over_file_over_default(tmp_dirs, stopper):
    cfg = tmp_dirs / "gateway.toml"
    cfg.write_text("[gateway]\nmax_batch = 10\n")
    cases = [
        ("default", [], {}, 64),
        ("file", ["--config", str(cfg)], {}, 10),
        ("file via env", [], {"HERMES_GATEWAY_CONFIG": str(cfg)}, 10),
        ("env over file", ["--config", str(cfg)], {"HERMES_GATEWAY_MAX_BATCH": "20"}, 20),
        ("flag over env and file", ["--config", str(cfg), "--max-batch", "30"], {"HERMES_GATEWAY_MAX_BATCH": "20"}, 30),
        ("empty env is unset", ["--config", str(cfg)], {"HERMES_GATEWAY_MAX_BATCH": ""}, 10),
    ]
    for i, (name, flags, env, want) in enumerate(cases):
        gw = start_gateway(tmp_dirs, *flags, env=env, runtime_dir=tmp_dirs / f"r{i}", data_dir=tmp_dirs / f"d{i}")
        stopper.append(gw)
        try:
            assert effective_max_batch(gw) == want, name
        finally:
            kill_tree(gw)


def test_toml_file_without_section_and_with_dashes(tmp_dirs, stopper):
    cfg = tmp_dirs / "flat.toml"
    cfg.write_text('max-batch = 20\nlog-level = "debug"\n')
    gw = start_gateway(tmp_dirs, "--config", str(cfg))
    stopper.append(gw)
    assert effective_max_batch(gw) == 20
    assert " debug " in gw.log(), "log_level from the file is in force"


# -- bad values: one line on stderr, exit 2 -----------------------------------------
@pytest.mark.parametrize("flags,words", [
    (["--port", "abc"], ["port", "--port", "abc"]),
    (["--port", "70000"], ["port"]),
    (["--reap-grace", "-1"], ["reap_grace"]),
    (["--warm-pool", "1.5"], ["warm_pool"]),
    (["--log-level", "loud"], ["log_level"]),
    (["--persist", "maybe"], ["persist"]),
    (["--echo-delay", "nan"], ["echo_delay"]),
    (["--runtime", "other"], ["runtime"]),
    (["--max-frame", "10"], ["max_frame"]),
    (["--no-such-flag"], ["--no-such-flag"]),
    (["--port"], ["--port"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_bad_flag(tmp_dirs, flags, words):
    proc = run_cli("run", "--runtime-dir", str(tmp_dirs / "run"), "--data-dir", str(tmp_dirs / "data"), *flags)
    assert_usage_error(proc, *words)
    assert not (tmp_dirs / "run" / "gateway.json").exists()


@pytest.mark.parametrize("name,value", [("PORT", "abc"), ("ECHO_DELAY", "-1"), ("HEARTBEAT_LIVENESS", "0"),
                                        ("WARM_POOL", "many"), ("LOG_LEVEL", "LOUD"), ("PERSIST", "2")])
def test_bad_env(tmp_dirs, name, value):
    proc = run_cli("run", "--runtime-dir", str(tmp_dirs / "run"), "--data-dir", str(tmp_dirs / "data"),
                   env=clean_env(**{f"HERMES_GATEWAY_{name}": value}))
    assert_usage_error(proc, f"HERMES_GATEWAY_{name}")


@pytest.mark.parametrize("text,words", [
    ('[gateway]\nmax_batch = "many"\n', ["max_batch"]),
    ("[gateway]\nport = 70000\n", ["port"]),
    ("[gateway]\nreap_grace = true\n", ["reap_grace"]),
    ('[gateway]\ncolour = "blue"\n', ["unknown setting", "colour"]),
    ('[gateway]\nconfig = "other.toml"\n', ["unknown setting", "config"]),
    ("[gateway\nport = 1\n", ["not valid TOML"]),
    ("gateway = 5\n", ["[gateway]"]),
], ids=["bad-int", "bad-port", "bool-for-float", "unknown-key", "config-key", "bad-toml", "not-a-table"])
def test_bad_file(tmp_dirs, text, words):
    cfg = tmp_dirs / "bad.toml"
    cfg.write_text(text)
    proc = run_cli("run", "--config", str(cfg), "--runtime-dir", str(tmp_dirs / "run"))
    assert_usage_error(proc, str(cfg), *words)


def test_unreadable_file(tmp_dirs):
    missing = tmp_dirs / "missing.toml"
    assert_usage_error(run_cli("run", "--config", str(missing)), str(missing))
    a_dir = tmp_dirs / "a-directory.toml"
    a_dir.mkdir()
    assert_usage_error(run_cli("run", "--config", str(a_dir)), str(a_dir))
    # the same through the environment
    assert_usage_error(run_cli("run", env=clean_env(HERMES_GATEWAY_CONFIG=str(missing))), str(missing))


def test_bad_subcommand_and_version():
    assert_usage_error(run_cli("launch"))
    assert_usage_error(run_cli())
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"hermes-gateway {__version__}"


# -- `make run`: the installed binary, no flags, embedded defaults -------------------
def _outside_make() -> dict:
    """The environment of a person at a shell: under `make test` a nested make would print its directory."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}


def test_make_run_invokes_the_installed_binary_without_flags():
    """`make run` would serve on 9119 forever; check what it runs instead (make -n, the venv counted as built)."""
    proc = subprocess.run(["make", "-n", "-o", ".venv/.installed", "run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=20, env=_outside_make())
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines == [".venv/bin/hermes-gateway run"], lines
    assert (ROOT / ".venv" / "bin" / "hermes-gateway").resolve() == (BIN / "hermes-gateway").resolve()
    # and from a fresh clone it first builds the venv and installs the project into it
    fresh = subprocess.run(["make", "-n", "-W", "pyproject.toml", "run"], cwd=ROOT, capture_output=True, text=True,
                           timeout=20, env=_outside_make())
    out = fresh.stdout
    assert "-m venv .venv" in out and "pip install" in out and "-e '.[test]'" in out
    assert out.strip().splitlines()[-1] == ".venv/bin/hermes-gateway run"


def test_binary_starts_on_embedded_defaults(tmp_dirs, stopper):
    home, xdg = tmp_dirs / "home", tmp_dirs / "xdg-run"
    home.mkdir()
    xdg.mkdir(mode=0o700)
    env = clean_env(HOME=str(home), XDG_RUNTIME_DIR=str(xdg))
    env.pop("XDG_DATA_HOME", None)
    env.pop("XDG_CONFIG_HOME", None)
    runtime_dir = xdg / "hermes-supervisor"
    data_dir = home / ".local" / "share" / "hermes-supervisor"
    out = tmp_dirs / "stdout.log"
    proc = subprocess.Popen([gateway_binary(), "run", "--port", "0"], stdout=open(out, "wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(tmp_dirs))
    gw = Gateway(proc=proc, runtime_dir=runtime_dir, data_dir=data_dir, args=["run", "--port", "0"], log_path=out)
    stopper.append(gw)

    def ready():
        assert proc.poll() is None, f"gateway exited {proc.returncode}: {gw.log()}"
        f = runtime_dir / "gateway.json"
        return json.loads(f.read_text()) if f.exists() else None

    gw.info = wait_for(ready, 20, what="gateway.json in $XDG_RUNTIME_DIR/hermes-supervisor")
    assert gw.info["host"] == "127.0.0.1" and gw.info["pid"] == proc.pid
    assert gw.info["token_file"] == str(runtime_dir / "token")
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
    wait_for(lambda: "HERMES_TUI_GATEWAY_URL" in gw.log(), 5, what="the banner")
    banner = gw.log()
    assert f"listening on ws://127.0.0.1:{gw.port}/api/ws" in banner
    assert str(runtime_dir / "token") in banner
    # not a terminal (a journal, a file): the banner says where the token is, never the token (issue 14 #11)
    assert f'HERMES_TUI_GATEWAY_URL="{gw.url.split("?")[0]}?token=$(cat {runtime_dir / "token"})"' in banner
    assert gw.token not in banner

    async def go():
        c = await Client.open(gw.url)
        res = await c.call("session.create", {"cols": 80})
        info = res["info"]
        assert info["runtime"] == "builtin" and info["agent"] == "echo"
        done = await c.turn(res["session_id"], "defaults work")
        assert done["payload"]["text"] == "defaults work"
        await c.close()

    run(go())
    assert (data_dir / "sessions.db").exists(), "the store lives under ~/.local/share/hermes-supervisor"
    assert effective_max_batch(gw) == 64
