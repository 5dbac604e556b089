"""Chaos fixtures: tagged gateways per test module, a Tally per scenario, and the summary table.

Every gateway started here carries HERMES_CHAOS_TAG=<random> in its environment; the
zygote and every worker inherit it, so a process that escaped its parent is still found
(/proc/PID/environ). SPT_NOENV=1 keeps setproctitle from writing the titles over that
environment (titles are then limited to the original command line's length, which is
longer than every title the project sets).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.chaos.invariants import TAG_ENV, Tally, tagged
from tests.conftest import Gateway, kill_tree, start_gateway

REPORT: list[Tally] = []


class Rig:
    """Starts gateways for one test module; all torn down (with anything tagged) at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = secrets.token_hex(6)
        self.started: list[Gateway] = []

    def start(self, *flags: str, name: str = "gw", preexec=None) -> Gateway:
        """A gateway in <root>/<name>; starting the same name again reuses its dirs (a restart) and tag."""
        d = self.root / name
        d.mkdir(exist_ok=True)
        tag = f"{self.tag}-{name}"
        gw = start_gateway(d, *flags, env={TAG_ENV: tag, "SPT_NOENV": "1"}, preexec=preexec)
        gw.chaos_tag = tag
        self.started.append(gw)
        return gw

    def close(self) -> list[int]:
        for gw in self.started:
            kill_tree(gw)
        left = [p for gw in self.started for p in tagged(gw.chaos_tag)]
        for p in left:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return [p.pid for p in left]


@pytest.fixture(scope="module")
def rig():
    root = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))  # short: ipc paths must stay < ~100 bytes
    r = Rig(root)
    yield r
    left = r.close()
    shutil.rmtree(root, ignore_errors=True)
    assert not left, f"tagged processes survived the module's teardown: {left}"


@pytest.fixture
def tally(request):
    t = Tally(scenario=request.node.name.removeprefix("test_"))
    REPORT.append(t)
    yield t
    rep = getattr(request.node, "rep_call", None)
    t.outcome = "pass" if rep is not None and rep.passed else ("skip" if rep is not None and rep.skipped else "FAIL")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep


def table(rows: list[Tally]) -> list[str]:
    head = ["scenario", "cycles", "faults", "checks passed", "leaked procs", "lost msgs", "max recovery s", "result"]
    body = [[t.scenario, str(t.cycles), str(t.faults), str(t.checks), str(t.leaked), str(t.lost),
             f"{t.recovery:.3f}", t.outcome] for t in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in body]


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    lines = table(REPORT)
    terminalreporter.section("chaos summary")
    for ln in lines:
        terminalreporter.write_line(ln)
    for t in REPORT:
        if t.notes:
            terminalreporter.write_line(f"{t.scenario}: " + "; ".join(t.notes[:12]))
    out = os.environ.get("CHAOS_TABLE")
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
