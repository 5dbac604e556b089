"""The checks every chaos scenario runs after its faults (reusable, real processes and files only).

- no process of the project outlives its session or the broker (process table + workers.json journal)
- session.active_list (and hermes-ps --json when installed) agree with the process table
- broker threads and fds back to baseline; RSS within +2 MiB of its post-warm-up value
- every message.complete a client got, and every answered prompt, is in sessions.db
- every request got exactly one response (or its connection closed); none went to the wrong client;
  no event crossed sessions
- a fresh client is served within 1 s
Each passed check counts in the scenario's Tally, which the summary table prints.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import psutil

from tests.chaos.tracked import Tracked

TAG_ENV = "HERMES_CHAOS_TAG"  # set in every chaos gateway's environment; inherited by zygote and workers
MiB = 1 << 20
RSS_SLACK = 2 * MiB
FRESH_CLIENT_LIMIT = 1.0  # s: the gateway serves a fresh client this soon after a fault stops


@dataclass
class Tally:
    """One row of the summary table."""

    scenario: str
    cycles: int = 0
    faults: int = 0
    checks: int = 0
    leaked: int = 0
    lost: int = 0
    recovery: float = 0.0  # the longest fresh-client time seen, s
    outcome: str = "?"
    notes: list[str] = field(default_factory=list)

    def ok(self, cond: bool, what: str) -> None:
        if not cond:
            raise AssertionError(what)
        self.checks += 1

    def recovered(self, seconds: float) -> None:
        self.recovery = max(self.recovery, seconds)


@dataclass
class Census:
    """The project's live processes, sorted by role (tagged by environment, so orphans are found too)."""

    gateway: int | None = None
    zygotes: list[int] = field(default_factory=list)
    lobbies: list[int] = field(default_factory=list)
    spares: list[int] = field(default_factory=list)
    sessions: dict[str, int] = field(default_factory=dict)  # runtime id -> pid
    children: dict[int, int] = field(default_factory=dict)  # pid -> worker pid: a worker's own subprocess
    strays: dict[int, str] = field(default_factory=dict)  # pid -> title: nobody's child it should be

    def managed(self) -> set[int]:
        return set(self.zygotes) | set(self.lobbies) | set(self.spares) | set(self.sessions.values())


def tagged(tag: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(TAG_ENV) == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def census(gateway_pid: int, tag: str) -> Census:
    c = Census()
    procs = tagged(tag)
    info: dict[int, tuple[int, str]] = {}
    for p in procs:
        try:
            info[p.pid] = (p.ppid(), " ".join(a for a in p.cmdline() if a))
        except psutil.Error:
            pass
    if gateway_pid in info:
        c.gateway = gateway_pid
    zygotes = {pid for pid, (ppid, title) in info.items() if title.startswith("hermes-zygote") and ppid == c.gateway}
    c.zygotes = sorted(zygotes)
    workers = {pid for pid, (ppid, title) in info.items() if ppid in zygotes and title.startswith("hermes-worker")}
    owner = {pid: pid for pid in workers}
    for pid, (ppid, title) in info.items():  # slash workers the fork server forked into a worker's group
        if ppid in zygotes and pid not in workers:
            try:
                if os.getpgid(pid) in workers:
                    owner[pid] = os.getpgid(pid)
            except OSError:
                pass
    grew = True
    while grew:  # a worker's subprocesses (the hermes runtime's slash worker), at any depth
        grew = False
        for pid, (ppid, _) in info.items():
            if pid not in owner and ppid in owner:
                owner[pid] = owner[ppid]
                grew = True
    for pid, (ppid, title) in info.items():
        if pid == c.gateway or pid in zygotes:
            continue
        if pid in owner and pid not in workers:
            c.children[pid] = owner[pid]
        elif pid not in workers:
            c.strays[pid] = f"ppid={ppid} {title[:80]}"
        elif title == "hermes-worker: lobby":
            c.lobbies.append(pid)
        elif "session=" in title:
            c.sessions[title.split("session=", 1)[1].split()[0]] = pid
        else:
            c.spares.append(pid)
    return c


def journal_pids(data_dir: Path) -> set[int]:
    try:
        return {int(r["pid"]) for r in json.loads((data_dir / "workers.json").read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


async def settle(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> tuple[bool, Any]:
    """Poll pred() without blocking the loop; (True, value) once truthy, (False, last value) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return True, value
        if time.monotonic() > deadline:
            return False, value
        await asyncio.sleep(interval)


def ps_binary() -> Path | None:
    path = Path(sys.executable).parent / "hermes-ps"
    return path if path.exists() else None


@dataclass
class Resources:
    threads: int
    fds: int
    rss: int


def resources(pid: int) -> Resources:
    p = psutil.Process(pid)
    return Resources(p.num_threads(), p.num_fds(), p.memory_info().rss)


class Checker:
    """The invariants for one gateway (replace .gw after a broker restart)."""

    def __init__(self, gw, tally: Tally, warm_pool: int = 1) -> None:
        self.gw = gw
        self.tally = tally
        self.warm_pool = warm_pool
        self.ps_checked = False

    @property
    def tag(self) -> str:
        return self.gw.chaos_tag

    # -- processes ------------------------------------------------------------
    def census(self) -> Census:
        return census(self.gw.pid, self.tag)

    def _process_problems(self, expect_sessions: set[str] | None) -> list[str]:
        c = self.census()
        problems = []
        if c.gateway is None:
            problems.append("the gateway is not running")
        if len(c.zygotes) != 1:
            problems.append(f"{len(c.zygotes)} fork servers")
        if len(c.lobbies) != 1:
            problems.append(f"{len(c.lobbies)} lobby workers")
        if len(c.spares) > self.warm_pool:
            problems.append(f"{len(c.spares)} spares > warm pool {self.warm_pool}")
        if expect_sessions is not None and set(c.sessions) != expect_sessions:
            problems.append(f"session workers {sorted(c.sessions)} != expected {sorted(expect_sessions)}")
        if c.strays:
            problems.append(f"strays {c.strays}")
        journal = journal_pids(self.gw.data_dir)
        if journal != c.managed():
            problems.append(f"journal {sorted(journal)} != live {sorted(c.managed())}")
        return problems

    async def processes(self, expect_sessions: set[str] | None = frozenset(), timeout: float = 15.0) -> None:
        """Wait for the process table to settle to: gateway, one zygote, one lobby, <= warm_pool spares,
        exactly the expected session workers, nothing else; and the journal lists exactly those."""
        expect = None if expect_sessions is None else set(expect_sessions)
        seen: list[list[str]] = [[]]

        def settled() -> bool:
            seen[0] = self._process_problems(expect)
            return not seen[0]

        # judge the snapshot that settled: a second look could catch the next spare forked in between,
        # before the broker's next journal flush (<= one 0.2 s tick), and call that a failure
        await settle(settled, timeout)
        problems = seen[0]
        if problems:
            c = self.census()
            extra = set(c.sessions) - (expect or set(c.sessions))
            self.tally.leaked += len(c.strays) + len(extra)
            problems.append(self.diagnosis())
        self.tally.ok(not problems, f"process table did not settle: {problems}")

    def diagnosis(self) -> str:
        """What the broker, its journal and its log said, for a failure that must explain itself in CI."""
        parts = []
        try:
            parts.append("journal: " + (self.gw.data_dir / "workers.json").read_text()[:2000])
        except OSError as exc:
            parts.append(f"journal unreadable: {exc}")
        binary = ps_binary()
        if binary is not None:
            out = subprocess.run([str(binary), "--all", "--json", "--runtime-dir", str(self.gw.runtime_dir)],
                                 capture_output=True, text=True, timeout=15)
            try:
                rows = json.loads(out.stdout)["workers"]
                keep = ("pid", "kind", "state", "session")
                parts.append("hermes-ps workers: " + json.dumps([{k: r.get(k) for k in keep} for r in rows]))
            except (ValueError, KeyError, TypeError):
                parts.append(f"hermes-ps ({out.returncode}): {(out.stdout or out.stderr)[:1000]}")
        c = self.census()
        parts.append(f"census: {c}")
        lines = [ln for ln in self.gw.log().splitlines() if " warning " in ln or " error " in ln or "Traceback" in ln]
        parts.append("log warnings/errors (last 30):\n" + "\n".join(lines[-30:]))
        parts.append("log tail:\n" + "\n".join(self.gw.log().splitlines()[-40:]))
        return "\n".join(parts)

    async def all_gone(self, within: float, since: float) -> float:
        """After the broker died (at monotonic `since`): every tagged process gone within `within` seconds."""
        t0 = since
        await settle(lambda: not tagged(self.tag), within + 3.0)
        took = time.monotonic() - t0
        left = tagged(self.tag)
        self.tally.leaked += len(left)
        self.tally.ok(not left, f"processes outlived the broker: {[p.pid for p in left]}")
        self.tally.ok(took <= within, f"processes took {took:.2f}s to go (limit {within}s)")
        return took

    # -- views agree with the process table -----------------------------------
    async def active_list(self, clients: Iterable[Tracked], observer: Tracked) -> None:
        live = [c for c in clients if not c.closed]
        bad: list[str] = []
        for _ in range(40):  # a title is set right after the reply: allow a moment to agree
            res = await observer.call("session.active_list", {})
            rows = {r["id"]: r for r in res["sessions"]}
            c = self.census()
            bad = [f"row {sid} has no live worker" for sid in rows if sid not in c.sessions]
            for client in live:
                for sid in client.attached:
                    if sid not in rows or not rows[sid]["attached"]:
                        bad.append(f"{client.name} attached to {sid} but active_list says {rows.get(sid)}")
                    if sid not in c.sessions:
                        bad.append(f"{client.name} attached to {sid} which has no worker process")
            bad += self._ps_problems(c)
            if not bad:
                break
            await asyncio.sleep(0.05)
        self.tally.ok(not bad, f"active_list / hermes-ps disagree with the process table: {bad}")
        if self.ps_checked and "hermes-ps agreed" not in self.tally.notes:
            self.tally.notes.append("hermes-ps agreed")

    def _ps_problems(self, c: Census) -> list[str]:
        """hermes-ps --all --json lists exactly the live workers, each session under its own pid."""
        binary = ps_binary()
        if binary is None:
            return []
        self.ps_checked = True
        out = subprocess.run([str(binary), "--all", "--json", "--runtime-dir", str(self.gw.runtime_dir)],
                             capture_output=True, text=True, timeout=15)
        if out.returncode != 0:
            return [f"hermes-ps exited {out.returncode}: {out.stderr[-300:]}"]
        rows = json.loads(out.stdout)["workers"]
        problems = []
        sessions = {r["session"]: r["pid"] for r in rows if r.get("kind") == "session" and r.get("session")}
        if sessions != c.sessions:
            problems.append(f"hermes-ps sessions {sessions} != process table {c.sessions}")
        pids = {r["pid"] for r in rows if r.get("pid")}
        workers = c.managed() - set(c.zygotes)
        if pids != workers:
            problems.append(f"hermes-ps pids {sorted(pids)} != live workers {sorted(workers)}")
        return problems

    # -- the store --------------------------------------------------------------
    def store(self, clients: Iterable[Tracked]) -> None:
        """Every answered prompt and every completed reply a client saw is in sessions.db."""
        args = list(self.gw.args)
        if "--runtime" in args and args[args.index("--runtime") + 1:][:1] == ["hermes"]:
            from worker.hermes.home import home_path

            # the hermes runtime keeps history in Hermes' own state.db (messages: session_id, role, content)
            db = Path(home_path(str(self.gw.data_dir))) / "state.db"
            user_q = "SELECT 1 FROM messages WHERE session_id=? AND role='user' AND content=?"
            reply_q = "SELECT 1 FROM messages WHERE session_id=? AND role='assistant' AND content=?"
        else:
            db = self.gw.data_dir / "sessions.db"
            user_q = "SELECT 1 FROM messages WHERE session_key=? AND role='user' AND text=?"
            reply_q = "SELECT 1 FROM messages WHERE session_key=? AND role='assistant' AND text=? AND status=?"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        missing = []
        try:
            for c in clients:
                for key, text in c.prompts:
                    if con.execute(user_q, (key, text)).fetchone() is None:
                        missing.append(f"prompt {key}:{text[:30]!r}")
                for key, text, status in c.completes():
                    args = (key, text, status) if reply_q.endswith("status=?") else (key, text)
                    if con.execute(reply_q, args).fetchone() is None:
                        missing.append(f"reply {key}:{text[:30]!r} ({status})")
        finally:
            con.close()
        self.tally.lost += len(missing)
        self.tally.ok(not missing, f"lost messages: {missing[:10]}")

    # -- the wire -------------------------------------------------------------
    def wire(self, clients: Iterable[Tracked]) -> None:
        for c in clients:
            self.tally.ok(not c.missing_answers(), f"{c.name}: requests without exactly one answer: "
                                                   f"{c.missing_answers()[:10]}")
            self.tally.ok(not c.foreign_answers(), f"{c.name}: answers to ids it never sent: {c.foreign_answers()}")
            self.tally.ok(not c.crossed_events(), f"{c.name}: events of sessions it never had: "
                                                  f"{c.crossed_events()[:3]}")

    # -- the broker process -----------------------------------------------------
    def resources(self) -> Resources:
        return resources(self.gw.pid)

    async def baseline(self, quiet: float = 0.3, timeout: float = 5.0) -> Resources:
        """The broker's threads and fds once they hold still for `quiet` s: a connection of an earlier
        scenario that is still being torn down must not be counted as part of the baseline."""
        last = self.resources()
        since = time.monotonic()
        deadline = since + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            now = self.resources()
            if (now.threads, now.fds) != (last.threads, last.fds):
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    async def back_to(self, base: Resources, warm_rss: int | None = None, timeout: float = 10.0) -> Resources:
        seen = [self.resources()]

        def settled() -> bool:
            # RSS too: the broker hands freed heap back (malloc_trim) about 1 s after the last worker went
            seen[0] = r = self.resources()
            return (r.threads == base.threads and r.fds == base.fds
                    and (warm_rss is None or r.rss <= warm_rss + RSS_SLACK))

        await settle(settled, timeout)
        now = seen[0]
        self.tally.ok(now.threads == base.threads, f"broker threads {now.threads} != baseline {base.threads}")
        self.tally.ok(now.fds == base.fds, f"broker fds {now.fds} != baseline {base.fds}")
        if warm_rss is not None:
            self.tally.ok(now.rss <= warm_rss + RSS_SLACK,
                          f"broker RSS {now.rss / MiB:.1f} MiB > {warm_rss / MiB:.1f} MiB after warm-up + 2 MiB")
        return now

    # -- serving ----------------------------------------------------------------
    async def fresh_client(self, via: dict | None = None, turn: bool = True) -> float:
        """Connect, ping and list within 1 s; then (untimed) create a session, run a turn, close it."""
        t0 = time.monotonic()
        c = await Tracked.open(self.gw.url, **(via or {}))
        try:
            await c.call("gateway.ping", timeout=5)
            await c.call("session.active_list", {}, timeout=5)
            took = time.monotonic() - t0
            self.tally.recovered(took)
            self.tally.ok(took <= FRESH_CLIENT_LIMIT, f"a fresh client waited {took:.2f}s (limit {FRESH_CLIENT_LIMIT}s)")
            if turn:
                sid = await c.create()
                done = await c.turn(sid, "fresh client after the fault", timeout=15)
                self.tally.ok(done["payload"]["status"] == "complete", f"fresh turn ended {done['payload']}")
                self.tally.ok(await c.call("session.close", {"session_id": sid}) == {"closed": True}, "close failed")
        finally:
            await c.close()
        return took

    async def finish(self, clients: list[Tracked], observer: Tracked | None = None,
                     base: Resources | None = None, warm_rss: int | None = None) -> None:
        """The standard tail of a scenario: views, wire, store while clients are open; then close everyone,
        let detached sessions be reaped, and check processes, journal, broker resources and a fresh client."""
        if observer is not None:
            await self.active_list(clients, observer)
        self.wire(clients)
        self.store(clients)
        for c in clients:
            if not c.closed:
                await c.close()
        if observer is not None:
            await observer.close()
        await self.processes(set())
        if base is not None:
            await self.back_to(base, warm_rss)
        await self.fresh_client()
        await self.processes(set())


async def gather_limited(coros: Iterable[Awaitable[Any]], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[Any]) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))
