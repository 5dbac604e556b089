"""Issue 8: the same workload against Hermes' own in-process gateway and this gateway, one after the other.

  A  Hermes 0.19.0's own gateway: `python -m hermes_cli.main serve --host 127.0.0.1 --port 0`, WebSocket
     /api/ws?token=T (the token from HERMES_DASHBOARD_SESSION_TOKEN), its own HERMES_HOME; its reaper of
     detached sessions is HERMES_TUI_WS_ORPHAN_REAP_GRACE_S (default 20 s), set to --grace here.
  B  this gateway, `--runtime hermes` (Hermes' session code in one worker process per session), --reap-grace.
  C  this gateway, builtin runtime and the `openai` agent, --reap-grace.

All three talk to the same fake OpenAI-compatible server (tests/fake_openai.py, its own process, a fixed
delay per streamed token) and are driven by the same client (tests/client.py's Client, with event arrival
times). Workload, per gateway:
  1. refresh soak: N cycles of connect -> session.create -> one prompt (until message.complete) -> abrupt
     close (Client.abort()); a sample after a 3-cycle warm-up, every K cycles, and once the gateway has
     reaped what the soak left (its grace window): session.active_list count, gateway RSS / threads /
     fds, descendant processes and their summed USS.
  2. per-session cost: S live attached sessions (one connection each, one turn each): USS and PSS of the
     gateway and all its descendants, and threads, minus the same before they were opened, per session.
  3. latency, R runs on a fresh connection each: connect -> gateway.ready; session.create -> response;
     -> session.info (agent ready); prompt.submit -> first message.delta; -> message.complete (p50/p99).
  4. concurrency: P of the live sessions prompt at once; time until all have completed.

Usage: .venv/bin/python bench/compare_hermes.py [--cycles 200 --sample-every 20 --sessions 20 --runs 30
       --concurrency 10] [--only A,B,C] [--grace 5] [--delay 0.01] [--json FILE] [--no-doc]
       [--from-json FILE [--add-to-history]]
Progress goes to stderr, the JSON document to stdout (and --json FILE); the Markdown table replaces this
script's section of docs/performance.md unless --no-doc, with two plots above it (bench/plots.py:
docs/compare-soak.png, docs/compare-memory.png; --from-json redraws them), and a full-size run adds a line to
bench/compare_hermes_runs.jsonl (the doc shows the last runs' ratios: one run on a shared machine is
noisy). Every process started is killed at the end, even
on an error or Ctrl-C (own process groups, every descendant ever seen, a finally).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import plots  # noqa: E402
from tests.client import Client  # noqa: E402

BIN = Path(sys.executable).parent
MIB = 1024 * 1024
DOC = ROOT / "docs" / "performance.md"
BEGIN = "<!-- compare-hermes:begin (bench/compare_hermes.py writes this section; edit the script, not the text) -->"
END = "<!-- compare-hermes:end -->"
REPLY = "Hello from the fake model: eight tokens in total."
LABELS = {"A": "A: Hermes serve (in-process)", "B": "B: gateway --runtime hermes",
          "C": "C: gateway builtin + openai"}


def note(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- processes --------------------------------------------------------------------------------------------
class Reaper:
    """Every process this run started, and every descendant of them ever seen: all killed at the end."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen] = []
        self.seen: dict[tuple[int, float], psutil.Process] = {}

    def started(self, proc: subprocess.Popen) -> None:
        self.popens.append(proc)
        self.note_tree(proc.pid)

    def note_tree(self, pid: int) -> list[psutil.Process]:
        try:
            top = psutil.Process(pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            return []
        for p in procs:
            try:
                self.seen.setdefault((p.pid, p.create_time()), p)
            except psutil.Error:
                pass
        return procs[1:]

    def alive(self) -> list[psutil.Process]:
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def kill_all(self) -> None:
        own = os.getpgrp()
        for proc in self.popens:
            try:
                if proc.poll() is None and os.getpgid(proc.pid) != own:
                    os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in list(self.seen.values()):
            try:
                if not p.is_running():  # psutil compares the create time: a reused pid is not ours
                    continue
                pgid = os.getpgid(p.pid)
                if pgid != own:
                    os.killpg(pgid, signal.SIGKILL)
                p.kill()
            except (psutil.Error, OSError):
                pass
        for proc in self.popens:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def clean_env() -> dict[str, str]:
    """The caller's environment without anything that would point a gateway elsewhere."""
    drop = ("HERMES_", "OPENAI_", "ANTHROPIC_", "OPENROUTER_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@dataclass
class Target:
    name: str
    proc: subprocess.Popen
    url: str
    root: Path
    log: Path
    settings: str
    reaper: Reaper = field(default_factory=Reaper)


def start_fake(root: Path, delay: float, reaper: Reaper) -> tuple[subprocess.Popen, str]:
    log = open(root / "fake.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_openai", "--port", "0", "--delay", str(delay),
                             "--reply", REPLY], cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                            start_new_session=True, env=clean_env())
    reaper.started(proc)
    line = proc.stdout.readline() if proc.stdout else b""
    if not line:
        raise RuntimeError(f"the fake OpenAI server did not start: {(root / 'fake.log').read_text()[-2000:]}")
    return proc, json.loads(line)["url"]


def wait_for(pred: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: exited {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready in {timeout:.0f} s: {log.read_text(errors='replace')[-3000:]}")


def start_hermes_serve(root: Path, base_url: str, grace: float) -> Target:
    """A: Hermes' own gateway with its own HERMES_HOME, token and orphan-reap grace."""
    home, cwd = root / "home", root / "cwd"
    home.mkdir(parents=True)
    cwd.mkdir()
    (home / "config.yaml").write_text(f"model:\n  provider: custom\n  default: fake-model\n  base_url: {base_url}\n")
    token = secrets.token_urlsafe(24)
    env = clean_env()
    env.update(HERMES_HOME=str(home), HERMES_DASHBOARD_SESSION_TOKEN=token, PYTHONUNBUFFERED="1",
               HERMES_TUI_WS_ORPHAN_REAP_GRACE_S=f"{grace:g}")
    log = root / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "hermes_cli.main", "serve", "--host", "127.0.0.1", "--port", "0"],
                            cwd=cwd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    target = Target("A", proc, "", root, log, f"HERMES_TUI_WS_ORPHAN_REAP_GRACE_S={grace:g} (Hermes' default: 20 s)")
    target.reaper.started(proc)

    def ready() -> int | None:
        m = re.search(r"HERMES_BACKEND_READY port=(\d+)", log.read_text(errors="replace"))
        return int(m.group(1)) if m else None

    port = wait_for(ready, 120, "hermes serve", proc, log)
    target.url = f"ws://127.0.0.1:{port}/api/ws?token={token}"
    return target


def start_ours(name: str, root: Path, flags: list[str], grace: float) -> Target:
    """B / C: `hermes-gateway run --port 0` in its own dirs; ready once gateway.json names it and a worker is up."""
    cwd = root / "cwd"
    cwd.mkdir(parents=True)
    args = [str(BIN / "hermes-gateway"), "run", "--port", "0", "--runtime-dir", str(root / "run"),
            "--data-dir", str(root / "data"), "--log-level", "warning", "--reap-grace", f"{grace:g}", *flags]
    log = root / "gateway.log"
    proc = subprocess.Popen(args, cwd=cwd, env=clean_env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    target = Target(name, proc, "", root, log, f"--reap-grace {grace:g} (default: 120 s)")
    target.reaper.started(proc)
    info_file = root / "run" / "gateway.json"

    def ready() -> str | None:
        try:
            info = json.loads(info_file.read_text())
        except (OSError, ValueError):
            return None
        if info.get("pid") != proc.pid:
            return None
        kids = target.reaper.note_tree(proc.pid)
        return info["url"] if any("hermes-worker" in " ".join(k.cmdline()) for k in kids if k.is_running()) else None

    target.url = wait_for(ready, 120, f"gateway {name}", proc, log)
    return target


def stop(target: Target) -> dict:
    """SIGTERM the gateway, then kill whatever it (or anything below it) left running."""
    target.reaper.note_tree(target.proc.pid)
    if target.proc.poll() is None:
        target.proc.send_signal(signal.SIGTERM)
        try:
            target.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.5)
    left = [" ".join(p.cmdline()[:3]) for p in target.reaper.alive()]
    target.reaper.kill_all()
    return {"left_running_after_sigterm": len(left), "left": left[:10]}


# -- measuring ----------------------------------------------------------------------------------------------
def kind_of(cmd: str) -> str:
    if "tui_gateway.slash_worker" in cmd:
        return "slash_worker"
    if cmd.startswith("hermes-worker: session="):
        return "session_worker"
    if cmd.startswith("hermes-worker"):
        return cmd.split(":", 1)[1].strip().split()[0]  # spare / lobby
    if cmd.startswith("hermes-zygote") or "worker.zygote" in cmd:
        return "zygote"
    return "other"


def snapshot(target: Target) -> dict:
    """The gateway process and every live descendant: memory, threads, fds, process kinds."""
    gw = psutil.Process(target.proc.pid)
    g = gw.memory_full_info()
    doc: dict[str, Any] = {"gateway_rss_mib": round(g.rss / MIB, 1), "gateway_uss_mib": round(g.uss / MIB, 1),
                           "gateway_pss_mib": round(g.pss / MIB, 1), "gateway_threads": gw.num_threads(),
                           "gateway_fds": gw.num_fds()}
    uss = pss = threads = 0
    kinds: dict[str, int] = {}
    kind_uss: dict[str, float] = {}
    for p in target.reaper.note_tree(gw.pid):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            m = p.memory_full_info()
            n = p.num_threads()
            kind = kind_of(" ".join(p.cmdline()))
        except psutil.Error:
            continue
        uss, pss, threads = uss + m.uss, pss + m.pss, threads + n
        kinds[kind] = kinds.get(kind, 0) + 1
        kind_uss[kind] = kind_uss.get(kind, 0.0) + m.uss / MIB
    doc.update({"descendants": sum(kinds.values()), "descendant_kinds": kinds,
                "descendant_kinds_uss_mib": {k: round(v, 1) for k, v in kind_uss.items()},
                "session_processes": kinds.get("slash_worker", 0) + kinds.get("session_worker", 0),
                "descendants_uss_mib": round(uss / MIB, 1), "descendants_pss_mib": round(pss / MIB, 1),
                "descendants_threads": threads,
                "total_uss_mib": round((g.uss + uss) / MIB, 1), "total_pss_mib": round((g.pss + pss) / MIB, 1),
                "total_threads": doc["gateway_threads"] + threads})
    return doc


def cpu_seconds(target: Target) -> dict[tuple[int, float], float]:
    """user + system CPU of the gateway and each live descendant, keyed by (pid, create time)."""
    out = {}
    for p in [psutil.Process(target.proc.pid), *target.reaper.note_tree(target.proc.pid)]:
        try:
            t = p.cpu_times()
            out[(p.pid, p.create_time())] = t.user + t.system
        except psutil.Error:
            pass
    return out


class TimedClient(Client):
    """tests/client.py's Client, plus the arrival time (perf_counter) of every event in `_t`."""

    async def _dispatch(self, item: dict) -> None:
        if item.get("method") == "event" and isinstance(item.get("params"), dict):
            item["params"]["_t"] = time.perf_counter()
        await super()._dispatch(item)


def is_(sid: str, kind: str, since: float = 0.0) -> Callable[[dict], bool]:
    return lambda e: e.get("session_id") == sid and e.get("type") == kind and e.get("_t", 0.0) >= since


async def open_session(url: str) -> tuple[TimedClient, str]:
    c = await TimedClient.open(url)
    try:
        res = await c.call("session.create", {"cols": 80}, timeout=60)
        sid = res["session_id"]
        await c.turn(sid, "hello", timeout=120)
    except BaseException:
        c.abort()
        raise
    return c, sid


async def listed(url: str) -> int:
    c = await TimedClient.open(url)
    try:
        return len((await c.call("session.active_list", {}, timeout=30)).get("sessions") or [])
    finally:
        await c.close()


async def sample(target: Target, label: str, **extra: Any) -> dict:
    doc = {"at": label, "active_list": await listed(target.url), **snapshot(target), **extra}
    note(f"  {target.name} {label}: listed {doc['active_list']}, gateway RSS {doc['gateway_rss_mib']} MiB, "
         f"{doc['gateway_threads']} threads, {doc['gateway_fds']} fds, {doc['descendants']} descendants "
         f"({doc['descendants_uss_mib']} MiB USS)")
    return doc


async def settle(target: Target, grace: float, baseline: int) -> float:
    """After the last close: wait out the grace window, then until nothing of a session is left (bounded)."""
    t0 = time.monotonic()
    await asyncio.sleep(grace)
    deadline = t0 + grace + 60
    while time.monotonic() < deadline:
        snap = snapshot(target)
        if snap["session_processes"] == 0 and snap["descendants"] <= baseline and await listed(target.url) == 0:
            break
        await asyncio.sleep(0.5)
    return round(time.monotonic() - t0, 1)


async def soak(target: Target, cycles: int, every: int, grace: float) -> dict:
    errors: list[str] = []

    async def cycle() -> None:
        try:
            c, _ = await open_session(target.url)
            c.abort()  # a refreshed browser tab: no close handshake, no session.close
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:200])

    for _ in range(3):
        await cycle()
    idle = snapshot(target)
    waited = await settle(target, grace, idle["descendants"] - idle["session_processes"])
    samples = [await sample(target, "warm-up", waited_s=waited)]
    t0 = time.monotonic()
    for i in range(1, cycles + 1):
        await cycle()
        if i % every == 0 or i == cycles:
            samples.append(await sample(target, f"cycle {i}"))
    soak_s = time.monotonic() - t0
    waited = await settle(target, grace, samples[0]["descendants"])
    samples.append(await sample(target, "after grace", waited_s=waited))
    warm, last = samples[0], samples[-1]
    return {"cycles": cycles, "seconds": round(soak_s, 1), "errors": len(errors), "error_examples": errors[:5],
            "samples": samples,
            "peak_gateway_rss_mib": max(s["gateway_rss_mib"] for s in samples),
            "peak_descendants": max(s["descendants"] for s in samples),
            "rss_delta_mib": round(last["gateway_rss_mib"] - warm["gateway_rss_mib"], 1),
            "leftover_processes": last["descendants"] - warm["descendants"],
            "leftover_session_processes": last["session_processes"], "listed_after_grace": last["active_list"],
            "settle_s": waited}


async def latency(target: Target, runs: int, pause: float) -> dict:
    steps: dict[str, list[float]] = {k: [] for k in ("connect_ready", "create", "agent_ready", "first_delta",
                                                     "complete", "first_slash")}
    errors = 0
    for _ in range(runs):
        try:
            t0 = time.perf_counter()
            c = await TimedClient.open(target.url)
            ready = next(e["_t"] for e in c.events if e["type"] == "gateway.ready")
            t1 = time.perf_counter()
            res = await c.call("session.create", {"cols": 80}, timeout=60)
            t2 = time.perf_counter()
            sid = res["session_id"]
            info = await c.wait_event(is_(sid, "session.info"), 60)
            t3 = time.perf_counter()
            await c.call("prompt.submit", {"session_id": sid, "text": "hello"}, timeout=60)
            delta = await c.wait_event(is_(sid, "message.delta", t3), 60)
            done = await c.wait_event(is_(sid, "message.complete", t3), 120)
            t4 = time.perf_counter()  # the session's first slash command (B starts Hermes' slash worker for it)
            out = await c.call("slash.exec", {"session_id": sid, "command": "help"}, timeout=60)
            t5 = time.perf_counter()
            if not str(out.get("output", "")).strip():
                raise RuntimeError(f"slash.exec help answered no output: {out}")
            for key, value in (("connect_ready", ready - t0), ("create", t2 - t1), ("agent_ready", info["_t"] - t1),
                               ("first_delta", delta["_t"] - t3), ("complete", done["_t"] - t3),
                               ("first_slash", t5 - t4)):
                steps[key].append(value * 1000)
            await c.call("session.close", {"session_id": sid}, timeout=30)
            await c.close()
        except Exception as exc:
            errors += 1
            note(f"  {target.name} latency run failed: {type(exc).__name__}: {exc}")
        await asyncio.sleep(pause)  # the same pause everywhere (a warm pool refills in it, as between users)
    return {"runs": runs, "errors": errors, **{k: summary(v) for k, v in steps.items()}}


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, -(-len(s) * q // 100) - 1))] if s else float("nan")


def summary(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p99_ms": round(pct(ms, 99), 1),
            "mean_ms": round(statistics.fmean(ms), 1)}


async def per_session_and_concurrency(target: Target, sessions: int, concurrency: int) -> tuple[dict, dict]:
    await asyncio.sleep(2.0)
    before = snapshot(target)
    clients: list[tuple[TimedClient, str]] = []
    try:
        for _ in range(sessions):
            clients.append(await open_session(target.url))
        await asyncio.sleep(3.0)  # slash workers booted, the warm pool refilled
        after = snapshot(target)
        after["active_list"] = await listed(target.url)
        per = {"sessions": sessions, "before": before, "after": after,
               **{f"{k}_per_session": round((after[k] - before[k]) / sessions, 2)
                  for k in ("total_uss_mib", "total_pss_mib", "total_threads")},
               "processes_per_session": round((after["descendants"] - before["descendants"]) / sessions, 2)}
        note(f"  {target.name} per session: {per['total_uss_mib_per_session']} MiB USS, "
             f"{per['total_pss_mib_per_session']} MiB PSS, {per['total_threads_per_session']} threads")
        group = clients[:concurrency]
        one = []
        for _ in range(3):  # one warm session alone, for scale
            t0 = time.perf_counter()
            await group[0][0].turn(group[0][1], "hello again", timeout=120)
            one.append((time.perf_counter() - t0) * 1000)
        cpu0 = cpu_seconds(target)
        t0 = time.perf_counter()
        ends = await asyncio.gather(*(_timed_turn(c, sid, t0) for c, sid in group))
        wall = (time.perf_counter() - t0) * 1000
        cpu1 = cpu_seconds(target)
        cpu = sum(v - cpu0.get(k, 0.0) for k, v in cpu1.items())
        conc = {"sessions": len(group), "all_complete_ms": round(wall, 1),
                "first_complete_ms": round(min(ends), 1), "one_session_turn_ms": round(statistics.median(one), 1),
                "cpu_ms_per_turn": round(cpu * 1000 / len(group), 1)}
        note(f"  {target.name} {len(group)} at once: all complete after {conc['all_complete_ms']} ms "
             f"(one alone: {conc['one_session_turn_ms']} ms), {conc['cpu_ms_per_turn']} ms CPU per turn")
        # then every session runs one slash command (A started its slash workers with the sessions; B starts
        # them now): the cost of a session that ran one (issue 13)
        for c, sid in clients:
            await c.call("slash.exec", {"session_id": sid, "command": "help"}, timeout=60)
        await asyncio.sleep(2.0)
        slashed = snapshot(target)
        per["after_slash"] = slashed
        per["total_uss_mib_per_session_slash"] = round((slashed["total_uss_mib"] - before["total_uss_mib"])
                                                       / sessions, 2)
        note(f"  {target.name} per session that ran a slash command: {per['total_uss_mib_per_session_slash']} MiB USS")
        return per, conc
    finally:
        for c, _ in clients:
            c.abort()


async def _timed_turn(c: TimedClient, sid: str, t0: float) -> float:
    await c.turn(sid, "hello again", timeout=120)
    return (time.perf_counter() - t0) * 1000


async def run_target(target: Target, args: argparse.Namespace) -> dict:
    note(f"{LABELS[target.name]}: {target.url.split('?')[0]}")
    doc: dict[str, Any] = {"label": LABELS[target.name], "grace": target.settings}
    doc["soak"] = await soak(target, args.cycles, args.sample_every, args.grace)
    note(f"  {target.name} latency ({args.runs} runs) ...")
    doc["latency"] = await latency(target, args.runs, args.pause)
    doc["per_session"], doc["concurrency"] = await per_session_and_concurrency(target, args.sessions,
                                                                               args.concurrency)
    return doc


# -- the report ---------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.splitlines()
        dirty = sorted(line[3:] for line in status if line[3:].endswith(".py"))
    except OSError:
        commit, dirty = "", []
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}",
            "hermes_agent": importlib.metadata.version("hermes-agent"), "commit": commit,
            "uncommitted_py": dirty}


# (label, path in a gateway's document, unit, rule for B against A)
#   lower: B wins or ties at <= A; within10: B/A <= 1.10; faster: B < A; zero: B == 0; within2: |B| <= 2
ROWS = [
    ("**Refresh soak**", None, "", ""),
    ("sessions listed after the grace window", "soak.listed_after_grace", "", "zero"),
    ("session processes left after the grace window", "soak.leftover_session_processes", "", "zero"),
    ("descendant processes: warm-up", "soak.samples.0.descendants", "", ""),
    ("descendant processes: peak during the soak", "soak.peak_descendants", "", ""),
    ("descendant processes: after the grace window", "soak.samples.-1.descendants", "", ""),
    ("descendants' USS after the grace window", "soak.samples.-1.descendants_uss_mib", "MiB", ""),
    ("gateway RSS: warm-up", "soak.samples.0.gateway_rss_mib", "MiB", ""),
    ("gateway RSS: peak during the soak", "soak.peak_gateway_rss_mib", "MiB", ""),
    ("gateway RSS: after the grace window", "soak.samples.-1.gateway_rss_mib", "MiB", ""),
    ("gateway RSS kept (after grace − warm-up)", "soak.rss_delta_mib", "MiB", "within2"),
    ("gateway threads: warm-up → after grace", "soak.samples.0.gateway_threads|soak.samples.-1.gateway_threads",
     "", ""),
    ("gateway fds: warm-up → after grace", "soak.samples.0.gateway_fds|soak.samples.-1.gateway_fds", "", ""),
    ("time from the last close until all was reaped", "soak.settle_s", "s", ""),
    ("soak wall time", "soak.seconds", "s", ""),
    ("**Per session** (live, attached, one turn)", None, "", ""),
    ("USS per session (gateway + all descendants)", "per_session.total_uss_mib_per_session", "MiB", "lower"),
    ("USS per session that ran a slash command", "per_session.total_uss_mib_per_session_slash", "MiB", "lower"),
    ("PSS per session (gateway + all descendants)", "per_session.total_pss_mib_per_session", "MiB", "lower"),
    ("threads per session", "per_session.total_threads_per_session", "", "lower"),
    ("processes per session", "per_session.processes_per_session", "", ""),
    ("**Latency** (p50 / p99)", None, "", ""),
    ("connect → gateway.ready", "latency.connect_ready", "ms", "within10"),
    ("session.create → response", "latency.create", "ms", "faster"),
    ("session.create → session.info (agent ready)", "latency.agent_ready", "ms", "within10"),
    ("prompt.submit → first message.delta", "latency.first_delta", "ms", "within10"),
    ("prompt.submit → message.complete", "latency.complete", "ms", "within10"),
    ("then the session's first slash.exec (/help)", "latency.first_slash", "ms", "within10"),
    ("**Concurrency**", None, "", ""),
    (None, "concurrency.all_complete_ms", "ms", "within10"),
    ("CPU per turn in that run (gateway + descendants)", "concurrency.cpu_ms_per_turn", "ms", ""),
    ("one warm session's turn alone", "concurrency.one_session_turn_ms", "ms", ""),
]


def _value(doc: dict, path: str) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if isinstance(cur, list):
            cur = cur[int(part)]
        elif isinstance(cur, dict):
            cur = cur.get(part)
        else:
            return None
    return cur


def _fmt(v: Any, unit: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, dict):  # a latency summary
        return f"{v['p50_ms']:g} / {v['p99_ms']:g} ms" if v.get("n") else "—"
    return f"{v:g} {unit}".strip()


def _num(v: Any) -> float | None:
    if isinstance(v, dict):
        return v.get("p50_ms")
    return v if isinstance(v, (int, float)) else None


def _ratio(x: Any, a: Any) -> str:
    x, a = _num(x), _num(a)
    if x is None or a is None:
        return "—"
    if a == 0:
        return "—" if x == 0 else "∞"
    return f"{x / a:.2f}"


def _verdict(rule: str, b: Any, a: Any) -> tuple[str, bool]:
    """(text, lost) for B against A under `rule`."""
    bn, an = _num(b), _num(a)
    if not rule or bn is None:
        return "", False
    if rule == "zero":
        return ("ok", False) if bn == 0 else ("**B loses**", True)
    if rule == "within2":
        return ("ok (≤ 2 MiB)", False) if abs(bn) <= 2 else ("**B loses**", True)
    if an is None:
        return "", False
    if rule == "lower":
        return ("B ≤ A", False) if bn <= an else ("**B loses**", True)
    if rule == "faster":
        return ("B faster", False) if bn < an else ("**B loses** (not faster)", True)
    if rule == "within10":
        if bn <= an:
            return "B faster", False
        return ("within 10%", False) if bn <= an * 1.10 else ("**B loses**", True)
    return "", False


def table(doc: dict) -> tuple[str, list[str]]:
    g = doc["gateways"]
    names = [n for n in ("A", "B", "C") if n in g]
    head = "| | " + " | ".join(LABELS[n] for n in names) + " | B/A | C/A | B vs A |"
    lines = [head, "|---" * (len(names) + 4) + "|"]
    lost: list[str] = []
    conc = doc["params"]["concurrency"]
    for label, path, unit, rule in ROWS:
        if path is None:
            lines.append(f"| {label} |" + " |" * (len(names) + 3))
            continue
        label = label or f"{conc} sessions prompting at once: all complete"
        if "|" in path:
            p1, p2 = path.split("|")
            cells = [f"{_value(g[n], p1)} → {_value(g[n], p2)}" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " | | | |")
            continue
        vals = {n: _value(g[n], path) for n in names}
        verdict, is_lost = _verdict(rule, vals.get("B"), vals.get("A")) if "B" in vals and "A" in vals else ("", False)
        if is_lost:
            lost.append(label)
        lines.append(f"| {label} | " + " | ".join(_fmt(vals[n], unit) for n in names)
                     + f" | {_ratio(vals.get('B'), vals.get('A'))} | {_ratio(vals.get('C'), vals.get('A'))}"
                     + f" | {verdict} |")
    return "\n".join(lines), lost


# Why B loses where it does: what bench/hermes_worker.py, /proc/PID/smaps of workers and a sys.modules diff of
# a worker against the fork server showed (docs/performance.md keeps the measurements).
WHY = {
    "USS per session": None,  # memory_note() writes it, with this run's numbers
    "PSS per session": None,
    "threads per session": (
        "**Threads per session.** A session in A adds its turn's and its slash worker's threads to one shared "
        "process (the slash worker's two pipe readers, the notification poller, …). A worker in B runs the turn's "
        "and the poller's (the pipe readers only once a slash command started its slash worker), "
        "plus the five every worker has (main loop, ZeroMQ's I/O and reaper threads, the Hermes dispatcher and "
        "Hermes' log writer: a spare has exactly these five; the main loop also checks the parent and Hermes' "
        "turn flags)."),
    "session.create → response": (
        "**session.create.** B runs the same Hermes handler A runs inline, in a spare that already ran it once "
        "(a throwaway create, taken back: the first run in a forked process copies every page it writes, ~10 ms "
        "instead of ~5), and without starting git for the branch of a cwd that is in no repository (Hermes "
        "starts it twice there for an empty answer; docs/hermes.md). The call and its answer still cross the "
        "broker and the ZeroMQ link (~2 ms), and the broker binds the session to that worker; A answers from the "
        "process that holds the WebSocket."),
    "session.create → session.info (agent ready)": (
        "**Agent ready.** The same Hermes agent build runs in both (the fork server pre-imports its modules and "
        "fills its tool-definition cache, which A fills on its first session), but in B it runs in a process "
        "that has never run it: every page of the preloaded heap it writes to is copied first (~27 MiB, ~7,000 "
        "copy-on-write faults by the end of the first turn, see memory) and its CPU caches are cold. "
        "Measured aside, create → first turn complete took 0.28 s of CPU in B's worker plus 0.02 s in the broker, "
        "0.25 s in A's gateway for a later session. A also starts the session's slash worker (~0.3 s of CPU) "
        "in that window, next to its agent build; B starts none until a slash command. On two cores both "
        "gateways saturate the CPU here, so the difference shows in wall time by an amount that moves with the "
        "other load on the machine (see Run to run)."),
    "prompt.submit → first message.delta": (
        "**First turn.** The same code in both; B's worker runs it for the first time in its process (copy-on-"
        "write faults: see agent ready), and every event crosses the worker link and the broker before it reaches the WebSocket. Measured aside with "
        "a 1 s pause after session.info, B's and A's turns were within ~10 ms of each other; "
        "a warm session's turn alone is the row \"one warm session's turn alone\"."),
    "prompt.submit → message.complete": "same as first delta",
    "then the session's first slash.exec": (
        "**First slash command.** A started the session's slash worker with the session, so by the time the "
        "turn is over it is up and /help is one round trip to it; B starts it for this first slash.exec "
        "(a fresh interpreter importing Hermes, ~0.3 s of CPU), which is what B saves in memory for every "
        "session that never sends one. Later slash commands in B go to the running slash worker, as in A."),
    "connect → gateway.ready": (
        "**Connect.** Both answer the WebSocket upgrade and send gateway.ready from one process; differences are "
        "the servers' (uvicorn + FastAPI in A, websockets in B)."),
    "gateway RSS kept (after grace − warm-up)": None,  # rss_note()
    "session processes left after the grace window": (
        "**Leftovers.** B still had session processes after the grace window."),
    "sessions listed after the grace window": None,
}


def rss_note(doc: dict) -> str:
    g = doc["gateways"]
    kept = {k: g[k]["soak"]["rss_delta_mib"] for k in ("A", "B", "C") if k in g}
    samples = ", ".join(f"{s['gateway_rss_mib']:g}" for s in g["B"]["soak"]["samples"])
    return (f"**RSS kept.** B's broker ended {kept['B']:g} MiB above its warm-up RSS"
            + (f" (C, the same broker with other workers: {kept['C']:g} MiB)" if "C" in kept else "")
            + f", over the 2 MiB the issue allows; its samples were {samples} MiB. That is the broker process "
            "alone (every session's memory went with its worker). Measured aside on the builtin runtime (same "
            "broker): Python's allocator held the same 13 arenas after 3 and after 400 refresh cycles "
            "(sys._debugmallocstats) and gc-tracked objects moved by under 100, so the growth is in C-level heap "
            "(glibc), and it levels off rather than climbs: 34.4 MiB after 3 cycles, 38.1 after 800, 37.2 after "
            "1,200. A kept "
            + (f"{kept['A']:g} MiB." if "A" in kept else "its own."))


def _per_kind(g: dict, kind: str) -> float:
    per = g["per_session"]
    before, after = per["before"]["descendant_kinds_uss_mib"], per["after"]["descendant_kinds_uss_mib"]
    return round((after.get(kind, 0.0) - before.get(kind, 0.0)) / per["sessions"], 1)


def memory_note(doc: dict) -> str:
    g = doc["gateways"]
    a, b = g["A"], g["B"]
    n = a["per_session"]["sessions"]
    a_gw = round((a["per_session"]["after"]["gateway_uss_mib"] - a["per_session"]["before"]["gateway_uss_mib"]) / n, 1)
    return (
        f"**Memory per session.** Per session, A adds {a['per_session']['total_uss_mib_per_session']:g} MiB USS: "
        f"its slash worker ({_per_kind(a, 'slash_worker'):g} MiB; Hermes starts `python -m "
        f"tui_gateway.slash_worker` per session) and {a_gw:g} MiB in its own process. B adds "
        f"{b['per_session']['total_uss_mib_per_session']:g} MiB: "
        + (f"the same slash worker ({_per_kind(b, 'slash_worker'):g} MiB) and " if _per_kind(b, "slash_worker")
           else "no slash worker (started at a session's first slash.exec; these sessions sent none), and ")
        + f"the session's worker ({_per_kind(b, 'session_worker'):g} MiB). "
        "The worker is forked from the fork server, which has imported Hermes (~1,900 modules), filled its "
        "caches and built (and dropped) one agent, so it shares that heap — until it writes to it: CPython 3.11 "
        "writes into every object it uses (reference counts, and the bytecode it specializes), so each page of the "
        "preloaded heap that building an agent and running a turn touch is copied into the worker. In "
        "/proc/PID/smaps of a worker after its first turn (~31 MiB), ~85 % are such copies (Python's object arenas "
        "and the malloc heap, at addresses the fork server had), and the first turn alone copies ~11.7 MiB that no "
        "rehearsal touches; thread stacks are 0.1 MiB. `gc.freeze()` keeps the collector off those pages but not "
        "the reference counts; Python 3.12's immortal objects would, 3.11 has none. A touches the same objects once, "
        "in one process, for all its sessions. The row after a slash command adds B's slash worker, forked from "
        "the same image (~12 MiB USS, all copied pages, ~1.5 MiB of it Hermes' logging, instead of ~37 MiB for a "
        "fresh interpreter), and the copies of the turns ten of the sessions ran since the first row (the "
        "concurrency part); A's slash worker was already in its first row. Tried and not kept: "
        "MALLOC_ARENA_MAX=1 (-0.7 MiB, first turn +18 ms), malloc trim and mmap thresholds (no change) "
        "(docs/hermes.md).")


def closing_note(doc: dict, lost: list[str]) -> str:
    out: list[str] = []
    n = doc["params"]["concurrency"]
    keys = [next((k for k in WHY if label.startswith(k)), "concurrency" if "at once" in label else label)
            for label in lost]
    for key in keys:
        text = WHY.get(key)
        if text == "same as first delta":
            text = WHY["prompt.submit → first message.delta"]
        if key == "USS per session" or (key == "PSS per session" and "USS per session" not in keys):
            text = memory_note(doc)
        elif key == "gateway RSS kept (after grace − warm-up)":
            text = rss_note(doc)
        elif key == "concurrency":
            cpu = {k: doc["gateways"][k]["concurrency"].get("cpu_ms_per_turn") for k in ("A", "B")}
            text = (f"**Concurrency.** {n} turns at once on {doc['machine']['cores']} cores are bound by the CPU: "
                    f"B used {cpu['B']:g} ms of CPU per turn (worker and broker) where A used "
                    f"{cpu['A']:g} ms. A runs its turns as threads of one warm process; in B each turn runs in its "
                    "own worker, whose events all cross the ZeroMQ link and the broker's event loop. Both build a "
                    "fresh OpenAI and httpx client per model request; B's workers share one TLS context per CA "
                    "bundle where A loads the bundle for every request (docs/hermes.md).")
        if text and text not in out:
            out.append(text)
    if not out:
        return "B does not lose on any row of this run."
    return "Where B loses in this run, and why:\n\n" + "\n\n".join(f"- {t}" for t in out)


HISTORY = ROOT / "bench" / "compare_hermes_runs.jsonl"
DEFAULTS = {"cycles": 200, "sample_every": 20, "sessions": 20, "runs": 30, "concurrency": 10}
STEPS = ("create", "agent_ready", "first_delta", "complete")


def summarize(doc: dict) -> dict:
    """One line of the run history: what moves from run to run on a shared machine."""
    g, m = doc["gateways"], doc["machine"]
    row: dict[str, Any] = {"date": m["date"], "commit": m["commit"], "load": m["loadavg_at_start"][0]}
    for name in ("A", "B", "C"):
        if name in g:
            row[name] = {**{s: g[name]["latency"][s].get("p50_ms") for s in STEPS},
                         "concurrency_ms": g[name]["concurrency"]["all_complete_ms"],
                         "uss_per_session": g[name]["per_session"]["total_uss_mib_per_session"],
                         "rss_kept": g[name]["soak"]["rss_delta_mib"]}
    return row


def record(doc: dict) -> None:
    """Append a full-size run (the issue's defaults, all three gateways) to the history."""
    if all(doc["params"].get(k) == v for k, v in DEFAULTS.items()) and set(doc["gateways"]) == {"A", "B", "C"}:
        with open(HISTORY, "a") as fh:
            fh.write(json.dumps(summarize(doc)) + "\n")


def history_table(last: int = 6) -> str:
    try:
        rows = [json.loads(line) for line in HISTORY.read_text().splitlines() if line.strip()][-last:]
    except (OSError, ValueError):
        return ""
    if len(rows) < 2:
        return ""

    def r(row: dict, key: str) -> str:
        a, b = row["A"].get(key), row["B"].get(key)
        return f"{b / a:.2f}" if a and b is not None else "—"

    out = ["Run to run (full runs on this machine, from bench/compare_hermes_runs.jsonl; B/A of the p50s — the "
           "load other work puts on the 2 cores moves them):", "",
           "| run | load | create | agent ready | first delta | complete | 10 at once | USS/session B, A | "
           "RSS kept B, A |", "|---" * 9 + "|"]
    for row in rows:
        out.append(f"| {row['date']} ({row['commit']}) | {row['load']:g} | " + " | ".join(r(row, k) for k in STEPS)
                   + f" | {r(row, 'concurrency_ms')} | {row['B']['uss_per_session']:g}, {row['A']['uss_per_session']:g}"
                   + f" MiB | {row['B']['rss_kept']:g}, {row['A']['rss_kept']:g} MiB |")
    return "\n".join(out)


def markdown(doc: dict) -> str:
    m, p = doc["machine"], doc["params"]
    tbl, lost = table(doc)
    graces = "; ".join(f"{n}: {g['grace']}" for n, g in doc["gateways"].items())
    return "\n".join([
        BEGIN,
        "## Side by side with Hermes' own gateway (issue 8)",
        "",
        f"`make bench-compare` (bench/compare_hermes.py), {m['date']}, commit {m['commit']}"
        + (f" plus uncommitted changes to {', '.join(m['uncommitted_py'])} (the shared work tree)"
           if m.get("uncommitted_py") else "") + f": {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}, hermes-agent "
        f"{m['hermes_agent']}; load average at start {m['loadavg_at_start']} (other work shares this machine).",
        "",
        f"One after the other on loopback ports, the same fake OpenAI-compatible server (its own process, "
        f"{p['delay'] * 1000:g} ms per streamed token, a reply of {len(REPLY.split())} words) and the same client "
        f"(tests/client.py). Refresh soak: {p['cycles']} cycles of connect → session.create → one prompt "
        f"(to message.complete) → abrupt close, sampled after a 3-cycle warm-up, every {p['sample_every']} cycles "
        f"and after the grace window ({graces}). Per session: {p['sessions']} live attached sessions (one "
        f"connection and one turn each), (all − before) / {p['sessions']} over the gateway and all its "
        f"descendants. Latency: {p['runs']} runs, each on a fresh connection: create, one turn, then the session's "
        "first slash.exec (/help), then session.close; "
        f"{p['pause']:g} s between runs. Concurrency: {p['concurrency']} of those live sessions prompt at once. "
        "`session.active_list` is what each gateway answers (A: every session it holds; B, C: attached ones and "
        "those detached for less than --list-grace). A starts Hermes' slash-worker subprocess with every session; "
        "B starts it at a session's first slash.exec (docs/hermes.md), which only the latency runs send. "
        "Raw figures: bench/compare_hermes.json.",
        "",
        plots.markdown(),
        "",
        tbl,
        "",
        closing_note(doc, lost),
        *(["", hist] if (hist := history_table()) else []),
        END,
    ])


def write_plots(doc: dict) -> None:
    try:
        for path in plots.write(doc):
            note(f"wrote {path.relative_to(ROOT)}")
    except ImportError:
        note("no plots: matplotlib is not installed (the `bench` extra: make bench-compare installs it, or "
             f"{sys.executable} -m pip install matplotlib)")


def write_doc(text: str) -> None:
    """Replace this script's section of docs/performance.md (or append it); the rest of the file is not ours."""
    current = DOC.read_text() if DOC.exists() else "# Performance\n"
    pattern = re.compile(re.escape(BEGIN.split(" (")[0]) + r".*?" + re.escape(END), re.S)
    if pattern.search(current):
        new = pattern.sub(lambda _: text, current, count=1)
    else:
        new = current.rstrip("\n") + "\n\n" + text + "\n"
    DOC.write_text(new)


# -- main ---------------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--sample-every", type=int, default=20)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--grace", type=float, default=5.0, help="reap grace of every gateway (s)")
    p.add_argument("--delay", type=float, default=0.01, help="the fake server's delay per streamed token (s)")
    p.add_argument("--pause", type=float, default=1.0, help="pause between latency runs (s)")
    p.add_argument("--only", default="A,B,C")
    p.add_argument("--json", default="", help="also write the JSON document here")
    p.add_argument("--no-doc", action="store_true", help="do not touch docs/performance.md")
    p.add_argument("--from-json", default="", help="run nothing: write the doc section from a saved document")
    p.add_argument("--add-to-history", action="store_true", help="with --from-json: record that run's summary too")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        if args.add_to_history:
            record(saved)
        if not args.no_doc:
            write_doc(markdown(saved))
            write_plots(saved)
        return 0
    args.concurrency = min(args.concurrency, args.sessions)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    root = Path(tempfile.mkdtemp(prefix="hgcmp-", dir="/tmp"))
    fake_reaper = Reaper()
    targets: list[Target] = []
    doc: dict[str, Any] = {"machine": machine(),
                           "params": {k: getattr(args, k) for k in ("cycles", "sample_every", "sessions", "runs",
                                                                    "concurrency", "grace", "delay", "pause")},
                           "gateways": {}}
    t_start = time.monotonic()
    try:
        _, base_url = start_fake(root, args.delay, fake_reaper)
        flags_b = ["--runtime", "hermes", "--openai-base-url", base_url, "--openai-model", "fake-model"]
        flags_c = ["--agent", "openai", "--openai-base-url", base_url, "--openai-model", "fake-model"]
        for name in [n.strip().upper() for n in args.only.split(",") if n.strip()]:
            if name == "A":
                target = start_hermes_serve(root / "A", base_url, args.grace)
            elif name in ("B", "C"):
                target = start_ours(name, root / name, flags_b if name == "B" else flags_c, args.grace)
            else:
                raise SystemExit(f"--only: unknown gateway {name!r} (A, B, C)")
            targets.append(target)
            try:
                t0 = time.monotonic()
                result = asyncio.run(run_target(target, args))
                result["wall_s"] = round(time.monotonic() - t0, 1)
            finally:
                stopped = stop(target)
            result["stop"] = stopped
            doc["gateways"][name] = result
    finally:
        for target in targets:
            target.reaper.kill_all()
        fake_reaper.kill_all()
        left = [p for t in targets for p in t.reaper.alive()] + fake_reaper.alive()
        if left:
            note(f"WARNING: still running after cleanup: {[p.pid for p in left]}")
        shutil.rmtree(root, ignore_errors=True)
    doc["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    text = json.dumps(doc, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if not args.no_doc and len(doc["gateways"]) > 1:
        record(doc)
        write_doc(markdown(doc))
        note(f"wrote {DOC.relative_to(ROOT)}")
        write_plots(doc)
    note(f"done in {doc['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
