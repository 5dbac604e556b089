"""hermes-ps presentation and --watch, against pure inputs and a real gateway."""

from __future__ import annotations

import json
import subprocess

from supervisor.commands import ps
from tests.conftest import BIN


def row(**kw) -> dict:
    base = {"session": "s", "key": "k", "pid": 1, "kind": "session", "state": "idle", "stopping": "", "attached": 1,
            "detached_for": None, "idle": 1.0, "heartbeat_age": 0.1, "uptime": 10.0, "cpu": 0.0, "rss": 1,
            "uss": 1, "threads": 1, "fds": 1, "children": 0}
    return base | kw


def test_human_units():
    assert [ps.human_duration(x) for x in (None, 0, 59.9, 61, 3599, 3600 * 2 + 180, 86400 * 3 + 7200)] == \
        ["-", "0s", "59s", "1m01s", "59m59s", "2h03m", "3d02h"]
    assert [ps.human_bytes(x) for x in (None, 0, 512, 2048, 23 * 1024 * 1024 + 400 * 1024, 3 * 1024 ** 3)] == \
        ["-", "0", "512", "2.0K", "23.4M", "3.0G"]


def test_select_filters_and_sorts():
    rows = [row(session="b", pid=3, rss=5, uptime=1.0), row(session="a", pid=2, rss=9, uptime=5.0),
            row(session="", kind="lobby", pid=1, rss=1, uptime=9.0, idle=None),
            row(session="", kind="spare", pid=4, rss=2, uptime=0.5)]
    assert [r["pid"] for r in ps.select(rows, False, None)] == [2, 3]  # sessions only, oldest first
    assert [r["pid"] for r in ps.select(rows, True, None)] == [1, 4, 2, 3]  # lobby, spare, then sessions
    assert [r["rss"] for r in ps.select(rows, True, "rss")] == [9, 5, 2, 1]  # numbers: largest first
    assert [r["session"] for r in ps.select(rows, False, "session")] == ["a", "b"]  # text: ascending
    assert [r["pid"] for r in ps.select(rows, True, "idle")][-1] == 1  # no value sorts last


def test_table_columns_and_alignment():
    text = ps.table([row(session="abc", pid=12345, detached_for=125.0, attached=0, cpu=12.5, rss=10 * 1024 ** 2)])
    head, line = text.splitlines()
    assert head.split() == list(ps.COLUMNS)
    cells = line.split()
    assert cells[0] == "abc" and cells[1] == "12345" and cells[4] == "2m05s" and cells[6] == "12.5"
    assert cells[7] == "10.0M"
    assert head.index("PID") + len("PID") == line.index("12345") + len("12345")  # numbers right-aligned


def test_watch_json_prints_one_object_per_line(gateway):
    proc = subprocess.Popen([str(BIN / "hermes-ps"), "--runtime-dir", str(gateway.runtime_dir), "--json", "--all",
                             "-w", "0.2"], stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait(10)
    docs = [json.loads(line) for line in lines]
    assert all(d["gateway"]["pid"] == gateway.pid for d in docs)
    assert docs[0]["time"] < docs[2]["time"]
    assert any(r["kind"] == "lobby" for r in docs[0]["workers"])


def test_watch_stops_with_exit_3_when_the_gateway_goes(gateway):
    proc = subprocess.Popen([str(BIN / "hermes-ps"), "--runtime-dir", str(gateway.runtime_dir), "-w", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "SESSION" in proc.stdout.readline() + proc.stdout.readline()
        gateway.proc.terminate()
        gateway.proc.wait(20)
        assert proc.wait(20) == 3
        assert str(gateway.runtime_dir) in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
