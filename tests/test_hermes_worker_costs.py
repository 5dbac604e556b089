"""Issue 13 item 3, what a hermes worker costs per create and per session: a spare runs Hermes' create once and
takes it back, so the client's create runs warm; no git is started for the branch of a cwd outside any
repository; and a worker runs no thread of ours but its main loop and Hermes' dispatcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.client import Client
from tests.conftest import kill_tree, run, start_gateway, wait_for
from tests.test_hermes_runtime import REPLY, fake  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parent.parent
REAL_GIT = shutil.which("git")


@pytest.fixture(scope="module")
def spied(fake):  # noqa: F811
    """A hermes gateway whose workers find a `git` on PATH that notes each call, then runs the real one."""
    if REAL_GIT is None:
        pytest.skip("git is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="hg-", dir="/tmp"))
    spy = tmp / "bin"
    spy.mkdir()
    calls = tmp / "git-calls"
    calls.touch()
    (spy / "git").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {REAL_GIT} "$@"\n')
    (spy / "git").chmod(0o755)
    g = start_gateway(tmp, "--runtime", "hermes", "--openai-base-url", fake.base_url, "--openai-model", "fake-model",
                      env={"PATH": f"{spy}{os.pathsep}{os.environ.get('PATH', '')}"})
    yield g, calls, tmp
    kill_tree(g)
    shutil.rmtree(tmp, ignore_errors=True)


def _git(*args: str, cwd: Path) -> None:
    subprocess.run([REAL_GIT, *args], cwd=cwd, check=True, capture_output=True)


def test_create_starts_no_git_outside_a_repository_and_gives_a_repositorys_branch(spied):
    g, calls, tmp = spied
    plain = tmp / "plain" / "sub"
    plain.mkdir(parents=True)
    repo = tmp / "repo"
    repo.mkdir()
    _git("init", "-q", "-b", "trunk", cwd=repo)
    (repo / "deep").mkdir()

    async def create(c: Client, cwd: Path) -> dict:
        created = await c.call("session.create", {"cols": 80, "cwd": str(cwd)}, timeout=30)
        await c.call("session.close", {"session_id": created["session_id"]})
        return created["info"]

    async def go() -> tuple[dict, dict]:
        c = await Client.open(g.url)
        try:
            return await create(c, plain), await create(c, repo / "deep")
        finally:
            await c.close()

    plain_info, repo_info = run(go(), 80)
    noted = calls.read_text().splitlines()
    assert plain_info["cwd"] == str(plain) and plain_info["branch"] == ""
    assert not [line for line in noted if str(plain) in line]  # the answer was known without starting git
    assert repo_info["branch"] == "trunk"  # inside a repository, git's own answer
    assert [line for line in noted if str(repo / "deep") in line]


def _threads_settle_at(g, title_part: str, most: int) -> None:
    """The worker's thread count comes down to `most` (a turn's or a timer's thread ends a moment later)."""
    pid = wait_for(lambda: next((p for p, t in g.workers().items() if title_part in t), None), 20,
                   what=f"a worker titled {title_part!r}")
    seen: list[int] = []
    try:
        wait_for(lambda: seen.append(psutil.Process(pid).num_threads()) or seen[-1] <= most, 5,
                 what=f"{title_part} at {most} threads")
    except AssertionError:
        raise AssertionError(f"{title_part}: {seen[-1]} threads, more than {most}") from None


def test_a_spare_warms_session_create_and_the_session_is_the_clients_alone(spied):
    g, _, _ = spied
    wait_for(lambda: "spare ran a throwaway session.create" in g.log(), 20, what="a spare's warm-up create in the log")
    # main loop, Hermes' dispatcher, ZeroMQ's I/O and reaper threads, Hermes' log writer: no parent-watch or
    # state thread (the main loop does both)
    _threads_settle_at(g, "spare", 5)

    async def go() -> None:
        c = await Client.open(g.url)
        try:
            created = await c.call("session.create", {"cols": 80}, timeout=30)
            sid = created["session_id"]
            done = await c.turn(sid, "hello", timeout=60)
            assert done["payload"]["text"] == REPLY
            assert {e.get("session_id") for e in c.events if e["type"] != "gateway.ready"} == {sid}
            _threads_settle_at(g, f"session={sid}", 6)  # and Hermes' notification poller
            await c.call("session.close", {"session_id": sid})
        finally:
            await c.close()

    run(go(), 80)


WARM_SCRIPT = textwrap.dedent("""
    import json, time
    from worker.hermes.preload import server
    from worker.hermes import warmup
    from tools import terminal_tool
    built = []
    make = server._make_agent
    server._make_agent = lambda *a, **k: built.append(a) or make(*a, **k)
    took = warmup.warm_create()
    time.sleep(0.5)  # past the create's deferred agent build (50 ms) and session-cap sweep (100 ms)
    with open({out!r}, "w") as f:
        json.dump({{"took": took, "sessions": list(server._sessions), "built": len(built),
                   "overrides": list(terminal_tool._task_env_overrides)}}, f)
""")


def test_the_warm_up_create_leaves_nothing_behind(tmp_path):
    """Run in a process of its own: importing Hermes redirects stdout and fills module state."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("model:\n  provider: custom\n  default: fake-model\n"
                                      "  base_url: http://127.0.0.1:9/v1\n")
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERMES_", "OPENAI_"))}
    env.update(HERMES_HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", WARM_SCRIPT.format(out=str(out))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["took"] > 0  # the create ran
    assert got["sessions"] == [] and got["built"] == 0 and got["overrides"] == []  # and left nothing behind


def test_a_cold_worker_answers_the_waiting_create_without_a_warm_up(fake, tmp_path):  # noqa: F811
    """With no spare (--warm-pool 0) the create already waits in the new worker: a rehearsal or a warm-up would
    only delay it (a spare serves a call that comes within its first REHEARSAL_DELAY at once, unrehearsed)."""
    g = start_gateway(tmp_path, "--runtime", "hermes", "--openai-base-url", fake.base_url, "--openai-model",
                      "fake-model", "--warm-pool", "0")
    try:
        async def go() -> None:
            c = await Client.open(g.url)
            try:
                created = await c.call("session.create", {"cols": 80}, timeout=40)
                await c.call("session.close", {"session_id": created["session_id"]})
            finally:
                await c.close()

        run(go(), 80)
        assert "spare rehearsed an agent build" not in g.log()
        assert "throwaway session.create" not in g.log()
    finally:
        kill_tree(g)
