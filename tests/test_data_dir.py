"""Issue 14 item 2: the data and runtime dirs cannot be turned against the gateway (the four findings, as seen).

A planted workers.json naming an unrelated process of ours kills nothing; a workers.json.tmp link is never
followed; a dir another user owns, can write, or reaches through their symlink is refused (exit 2, one line);
in a 0755 data dir under umask 022 every file is still 0600.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess

import psutil
import pytest

from protocol.marker import MARKER_ENV, worker_tag
from tests.conftest import gateway_binary, pid_alive, wait_for

NOBODY = 65534


def _refused(runtime_dir, data_dir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_GATEWAY_")}
    res = subprocess.run([gateway_binary(), "run", "--port", "0", "--runtime-dir", str(runtime_dir),
                          "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=30, env=env)
    return res


def _needs_root():
    if os.getuid() != 0:
        pytest.skip("making a file another user's needs root (chown)")


def test_a_planted_journal_naming_an_unrelated_process_of_ours_kills_nothing(gateway_factory, tmp_dirs):
    data = tmp_dirs / "data"
    data.mkdir(mode=0o700)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        p = psutil.Process(bystander.pid)
        # exactly what a worker's row looks like: right pid, right start time, its own group
        rows = [{"pid": p.pid, "create_time": p.create_time(), "pgid": p.pid, "kind": "session", "session": "k1"},
                {"pid": p.pid, "create_time": p.create_time(), "pgid": os.getpgid(0), "kind": "zygote"}]
        (data / "workers.json").write_text(json.dumps(rows))
        gw = gateway_factory(data_dir=data)
        assert bystander.poll() is None, "an unrelated process named in workers.json was killed"
        assert "killed a worker left by a previous broker" not in gw.log()
    finally:
        bystander.kill()
        bystander.wait(5)


def test_a_journaled_leftover_with_our_marker_is_still_killed(gateway_factory, tmp_dirs):
    data = tmp_dirs / "data"
    data.mkdir(mode=0o700)
    env = {**os.environ, MARKER_ENV: worker_tag(str(data))}
    left = subprocess.Popen(["sleep", "301"], start_new_session=True, stdin=subprocess.DEVNULL, env=env)
    try:
        p = psutil.Process(left.pid)
        rows = [{"pid": p.pid, "create_time": p.create_time(), "pgid": p.pid, "kind": "session", "session": "k1"}]
        (data / "workers.json").write_text(json.dumps(rows))
        gateway_factory(data_dir=data)
        assert left.wait(5) == -9
    finally:
        if left.poll() is None:
            left.kill()
            left.wait(5)


def test_a_journal_tmp_link_is_never_followed(gateway_factory, tmp_dirs):
    data = tmp_dirs / "data"
    data.mkdir(mode=0o700)
    victim = tmp_dirs / "victim.txt"
    victim.write_text("precious\n")
    (data / "workers.json.tmp").symlink_to(victim)
    gw = gateway_factory(data_dir=data)
    wait_for(lambda: (data / "workers.json").exists(), 5, what="the journal written")
    rows = json.loads((data / "workers.json").read_text())
    assert any(r["pid"] == gw.pid or r["kind"] == "zygote" for r in rows)
    assert victim.read_text() == "precious\n"
    assert not list(data.glob("workers.json.*.tmp"))  # no temp file left behind


def test_a_runtime_dir_reached_through_another_users_symlink_is_refused(tmp_dirs):
    _needs_root()
    real = tmp_dirs / "real-run"
    real.mkdir(mode=0o700)
    link = tmp_dirs / "run"
    link.symlink_to(real)
    os.lchown(link, NOBODY, NOBODY)
    res = _refused(link, tmp_dirs / "data")
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and "runtime dir" in res.stderr and "symlink owned by uid 65534" in res.stderr
    assert not (real / "token").exists()


@pytest.mark.parametrize("which", ["runtime", "data"])
def test_a_dir_owned_by_someone_else_or_writable_by_others_is_refused(tmp_dirs, which):
    _needs_root()
    run, data = tmp_dirs / "run", tmp_dirs / "data"
    for d in (run, data):
        d.mkdir(mode=0o700)
    target = run if which == "runtime" else data
    os.chown(target, NOBODY, NOBODY)
    res = _refused(run, data)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "owned by uid 65534" in res.stderr, res
    os.chown(target, 0, 0)
    os.chmod(target, 0o777)
    res = _refused(run, data)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "writable by others" in res.stderr, res
    assert not (data / "sessions.db").exists() and not (run / "token").exists()


def test_files_in_a_0755_data_dir_under_umask_022_are_0600(gateway_factory, tmp_dirs):
    data = tmp_dirs / "data"
    data.mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        gw = gateway_factory(data_dir=data)  # the gateway inherits the umask
    finally:
        os.umask(old)
    wait_for(lambda: (data / "sessions.db-wal").exists() and (data / "workers.json").exists(), 5,
             what="store and journal files")
    for name in ("sessions.db", "sessions.db-wal", "sessions.db-shm", "workers.json"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert pid_alive(gw.pid)


def test_real_leftovers_of_a_killed_broker_carry_the_marker_and_are_swept(gateway_factory, tmp_dirs):
    """End to end: the fork server held (SIGSTOP) so its workers outlive a SIGKILLed broker; the next gateway
    on the same dirs recognises them by uid, start time and marker, and kills them and the fork server."""
    import signal

    from supervisor.ops.journal import is_ours
    from tests.client import Client
    from tests.conftest import run

    first = gateway_factory()

    async def create():
        c = await Client.open(first.url)
        await c.create()
        await c.close()

    run(create())
    wait_for(lambda: first.session_workers(), 5, what="a session worker")
    marker = worker_tag(str(first.data_dir))
    kids = first.descendants()
    zygote = next(p for p in kids if "hermes-zygote" in " ".join(p.cmdline()))
    workers = [p for p in kids if " ".join(p.cmdline()).startswith("hermes-worker")]
    assert len(workers) >= 2 and all(is_ours(p, marker) for p in [zygote, *workers])
    assert not is_ours(psutil.Process(first.pid), marker)  # the broker itself is not a worker
    wait_for(lambda: len(json.loads((first.data_dir / "workers.json").read_text())) >= 3, 5,
             what="zygote and workers journaled")
    os.kill(zygote.pid, signal.SIGSTOP)  # held: it cannot take its workers with it
    try:
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(5)
        assert all(pid_alive(p.pid) for p in workers)
        second = gateway_factory(runtime_dir=first.runtime_dir, data_dir=first.data_dir)
        wait_for(lambda: not any(pid_alive(p.pid) for p in [zygote, *workers]), 5, what="the leftovers killed")
        assert second.log().count("killed a worker left by a previous broker") >= len(workers)
    finally:
        for p in [zygote, *workers]:
            try:
                p.kill()
            except psutil.Error:
                pass
