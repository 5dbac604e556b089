"""Issue 3 benchmark: how fast a vanished or hung session is reclaimed, and whether refreshes leak.

Measured against the installed `hermes-gateway` over real WebSockets, with real pids:
  * disconnect -> pid gone, minus reap_grace (the reaper's overshoot), --reap-grace 1;
  * hung worker (SIGSTOP) -> `session.reclaimed` at the client, minus liveness x interval
    (default heartbeat 1 s x 3), and a crashed worker (SIGKILL) -> `session.reclaimed`;
  * a soak of --cycles refresh cycles (connect, create, prompt, abrupt close) with the curve of
    live workers, broker RSS, threads and fds every 50 cycles, and the deltas once settled
    against a baseline taken after a warm-up in the same run.

Usage: .venv/bin/python bench/reclaim.py [--trials 40] [--hung-trials 10] [--cycles 500]
(progress on stderr, one JSON document on stdout)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Gateway, machine, note, pct, start_gateway  # noqa: E402
from tests.client import Client  # noqa: E402

TARGETS = {"reclaim_overshoot_p99_s": 1.0, "soak_rss_delta_mib": 2.0, "soak_threads_delta": 0, "soak_fds_delta": 0,
           "soak_stray_workers": 0}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stats(values: list[float]) -> dict:
    return {"n": len(values), "p50_s": round(pct(values, 50), 3), "p99_s": round(pct(values, 99), 3),
            "min_s": round(min(values), 3), "max_s": round(max(values), 3)}


async def wait_gone(pid: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} still alive after {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic()


async def in_batches(make, n: int, width: int) -> list:
    """Run n trials, `width` at a time (trials are seconds of waiting, not CPU)."""
    out = []
    for start in range(0, n, width):
        out += await asyncio.gather(*(make() for _ in range(min(width, n - start))))
    return out


# -- disconnect -> reaped ----------------------------------------------------------
async def disconnect_trial(gw: Gateway, grace: float) -> float:
    c = await Client.open(gw.url)
    res = await c.call("session.create", {"cols": 80})
    pid = res["info"]["pid"]
    await c.turn(res["session_id"], "about to vanish")
    c.abort()
    t0 = time.monotonic()
    t1 = await wait_gone(pid, grace + 30)
    return (t1 - t0) - grace


def bench_disconnect(trials: int, grace: float) -> dict:
    gw = start_gateway("--reap-grace", str(grace), "--warm-pool", "5")
    try:
        asyncio.run(in_batches(lambda: disconnect_trial(gw, grace), 5, 5))  # warm-up
        overshoot = asyncio.run(in_batches(lambda: disconnect_trial(gw, grace), trials, 5))
    finally:
        gw.stop()
    return {"reap_grace_s": grace, "overshoot": stats(overshoot)}


# -- hung / crashed worker -> reclaimed --------------------------------------------
async def fault_trial(gw: Gateway, sig: int) -> tuple[float, float]:
    c = await Client.open(gw.url)
    res = await c.call("session.create", {"cols": 80})
    sid, pid = res["session_id"], res["info"]["pid"]
    await c.turn(sid, "about to hang")
    os.kill(pid, sig)
    t0 = time.monotonic()
    ev = await c.wait_event(lambda e: e.get("session_id") == sid and e["type"] == "session.reclaimed", 60)
    t1 = time.monotonic()
    t2 = await wait_gone(pid, 10)
    await c.close()
    assert ev["payload"]["reason"] == ("heartbeat_lost" if sig == signal.SIGSTOP else "worker_exit"), ev
    return t1 - t0, t2 - t0


def bench_faults(trials: int, interval: float, liveness: int) -> dict:
    gw = start_gateway("--heartbeat-interval", str(interval), "--heartbeat-liveness", str(liveness),
                       "--warm-pool", "5")
    try:
        hung = asyncio.run(in_batches(lambda: fault_trial(gw, signal.SIGSTOP), trials, 5))
        crashed = asyncio.run(in_batches(lambda: fault_trial(gw, signal.SIGKILL), trials, 5))
    finally:
        gw.stop()
    timeout = interval * liveness
    return {
        "heartbeat_interval_s": interval, "heartbeat_liveness": liveness, "heartbeat_timeout_s": timeout,
        "hung_sigstop_to_reclaimed": stats([a for a, _ in hung]),
        "hung_overshoot_over_timeout": stats([a - timeout for a, _ in hung]),
        "hung_sigstop_to_pid_gone": stats([b for _, b in hung]),
        "crash_sigkill_to_reclaimed": stats([a for a, _ in crashed]),
    }


# -- the refresh soak ----------------------------------------------------------------
def broker_figures(proc: psutil.Process) -> dict:
    return {"rss_kib": proc.memory_info().rss // 1024, "threads": proc.num_threads(), "fds": proc.num_fds()}


def session_workers(gw: Gateway) -> list[str]:
    return [t for t in gw.workers().values() if "session=" in t]


async def refresh(gw: Gateway) -> None:
    c = await Client.open(gw.url)
    sid = await c.create()
    await c.turn(sid, "hello from a tab that is about to refresh")
    c.abort()  # no session.close, no close handshake: what a browser refresh does


async def settle(gw: Gateway, keep: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(session_workers(gw)) > keep and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def soak(gw: Gateway, cycles: int, grace: float, warmup: int) -> dict:
    proc = psutil.Process(gw.proc.pid)
    observer = await Client.open(gw.url)
    mine = await observer.create()

    async def settled() -> dict:
        """Figures once every refreshed session's grace is over (and the broker has trimmed its heap)."""
        await settle(gw, 1, grace + 10)
        await asyncio.sleep(grace + 2)
        return broker_figures(proc)

    start = await settled()
    for _ in range(warmup):
        await refresh(gw)
    baseline = await settled()
    curve, mid = [], {}
    busy = 0.0
    for i in range(1, cycles + 1):
        t0 = time.monotonic()
        await refresh(gw)
        busy += time.monotonic() - t0
        if i % 50 == 0:
            row = {"cycle": i, "live_session_workers": len(session_workers(gw)), "workers": len(gw.workers()),
                   **broker_figures(proc)}
            curve.append(row)
            note(f"  soak {row}")
        if i == cycles // 2:
            mid = await settled()
            note(f"  settled at cycle {i}: {mid}")
    final = await settled()
    rows = (await observer.call("session.active_list", {"current_session_id": mine}))["sessions"]
    left = session_workers(gw)
    others = sorted(t for t in gw.workers().values() if "session=" not in t)
    await observer.close()
    return {
        "cycles": cycles, "warmup_cycles": warmup, "reap_grace_s": grace, "cycles_per_s": round(cycles / busy, 1),
        "start": start, "baseline_after_warmup": baseline, "settled_at_half": mid, "final": final, "curve": curve,
        "rss_delta_mib": round((final["rss_kib"] - baseline["rss_kib"]) / 1024, 3),
        "rss_delta_from_start_mib": round((final["rss_kib"] - start["rss_kib"]) / 1024, 3),
        "rss_delta_second_half_mib": round((final["rss_kib"] - mid["rss_kib"]) / 1024, 3) if mid else None,
        "threads_delta": final["threads"] - baseline["threads"], "fds_delta": final["fds"] - baseline["fds"],
        "stray_workers": len([t for t in left if f"session={mine}" not in t]),
        "active_list_rows": len(rows), "non_session_workers": others,
    }


def bench_soak(cycles: int, grace: float, warmup: int) -> dict:
    gw = start_gateway("--reap-grace", str(grace))
    try:
        return asyncio.run(soak(gw, cycles, grace, warmup))
    finally:
        gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=40, help="disconnect trials")
    ap.add_argument("--hung-trials", type=int, default=10, help="SIGSTOP and SIGKILL trials each")
    ap.add_argument("--cycles", type=int, default=500, help="refresh cycles in the soak")
    ap.add_argument("--warmup", type=int, default=200,
                    help="refresh cycles before the soak's baseline (the allocator's high-water settles)")
    ap.add_argument("--grace", type=float, default=1.0, help="--reap-grace for the disconnect trials and soak")
    ap.add_argument("--heartbeat-interval", type=float, default=1.0)
    ap.add_argument("--heartbeat-liveness", type=int, default=3)
    args = ap.parse_args()
    out: dict = {"bench": "reclaim", "machine": machine()}
    note("disconnect -> reaped ...")
    out["disconnect"] = bench_disconnect(args.trials, args.grace)
    note("hung / crashed worker -> reclaimed ...")
    out["faults"] = bench_faults(args.hung_trials, args.heartbeat_interval, args.heartbeat_liveness)
    note(f"soak of {args.cycles} refresh cycles ...")
    out["soak"] = bench_soak(args.cycles, args.grace, args.warmup)
    s = out["soak"]
    measured = {"reclaim_overshoot_p99_s": out["disconnect"]["overshoot"]["p99_s"],
                "soak_rss_delta_mib": s["rss_delta_mib"], "soak_threads_delta": s["threads_delta"],
                "soak_fds_delta": s["fds_delta"], "soak_stray_workers": s["stray_workers"]}
    out["targets"] = {k: {"target": TARGETS[k], "measured": v, "met": abs(v) <= TARGETS[k] if k.endswith("_delta")
                          else v <= TARGETS[k]} for k, v in measured.items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
