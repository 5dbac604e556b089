"""Issue 13: a session's start with `--runtime hermes`, two code trees (before / after) and Hermes' own gateway.

Runs compare_hermes.py's latency workload (a fresh connection and a fresh session per run: create ->
response, -> session.info, submit -> first delta, -> complete, first slash.exec) against each target in
turn, interleaved over --rounds rounds so the machine's load moves them alike: A (Hermes' own `hermes
serve`, optional) and `hermes-gateway run --runtime hermes` once per --tree (its own PYTHONPATH: e.g. a
`git archive` of the old commit and this worktree). All share one fake OpenAI server. Reports, per target,
the p50 of every round's runs and the median over rounds, and each tree's ratio to A.

Usage: .venv/bin/python bench/hermes_start.py --tree old=/tmp/old --tree new=. [--with-a] [--rounds 3]
       [--runs 5]   (progress on stderr, JSON on stdout)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare_hermes import Reaper, latency, note, start_fake, start_hermes_serve, start_ours, stop  # noqa: E402

STEPS = ("create", "agent_ready", "first_delta", "complete", "first_slash")


def run_one(name: str, tree: str | None, base_url: str, runs: int, pause: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"hgs-{name}-", dir="/tmp"))
    saved = os.environ.get("PYTHONPATH")
    try:
        if tree is None:
            target = start_hermes_serve(root, base_url, 5.0)
        else:
            os.environ["PYTHONPATH"] = str(Path(tree).resolve())
            target = start_ours(name, root, ["--runtime", "hermes", "--openai-base-url", base_url,
                                             "--openai-model", "fake-model"], 5.0)
        try:
            asyncio.run(asyncio.sleep(2.0))  # the warm pool's spare rehearses
            return asyncio.run(latency(target, runs, pause))
        finally:
            stop(target)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], help="NAME=PATH of a code tree to run B from")
    p.add_argument("--with-a", action="store_true", help="also run Hermes' own gateway (A)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--pause", type=float, default=1.0)
    args = p.parse_args()
    targets: list[tuple[str, str | None]] = [("A", None)] if args.with_a else []
    targets += [tuple(t.split("=", 1)) for t in args.tree]  # type: ignore[misc]
    root = Path(tempfile.mkdtemp(prefix="hgs-", dir="/tmp"))
    reaper = Reaper()
    fake, base_url = start_fake(root, 0.01, reaper)
    rounds: dict[str, list[dict]] = {name: [] for name, _ in targets}
    try:
        for r in range(args.rounds):
            for name, tree in targets:
                note(f"round {r + 1}: {name}")
                rounds[name].append(run_one(name, tree, base_url, args.runs, args.pause))
    finally:
        reaper.kill_all()
    doc: dict = {"runs_per_round": args.runs, "rounds": args.rounds, "targets": {}}
    for name, per in rounds.items():
        doc["targets"][name] = {
            step: {"p50_per_round_ms": [x[step].get("p50_ms") for x in per],
                   "median_ms": round(statistics.median(x[step]["p50_ms"] for x in per if x[step].get("n")), 1)}
            for step in STEPS}
        doc["targets"][name]["errors"] = sum(x["errors"] for x in per)
    if "A" in doc["targets"]:
        a = doc["targets"]["A"]
        doc["ratio_to_A"] = {name: {s: round(t[s]["median_ms"] / a[s]["median_ms"], 2) for s in STEPS}
                             for name, t in doc["targets"].items() if name != "A"}
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
