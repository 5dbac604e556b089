"""Pictures of a bench/compare_hermes.py document: the refresh soak and the per-session memory, as PNGs.

Drawn from the saved JSON (`--from-json` redraws them without running anything), written beside
docs/performance.md, which shows them above its table. matplotlib is the optional `bench` extra
(`make bench-compare` installs it); without it the doc is still written and this says how to get the plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOAK_PNG = "compare-soak.png"
MEMORY_PNG = "compare-memory.png"
COLORS = {"A": "#c0392b", "B": "#2471a3", "C": "#229954"}
SHORT = {"A": "A: Hermes' own gateway (in-process)", "B": "B: this gateway, --runtime hermes",
         "C": "C: this gateway, builtin + openai"}


def _soak_points(soak: dict, gap: float) -> tuple[list[float], list[dict]]:
    """x per sample: the warm-up at 0, 'cycle N' at N, 'after grace' one `gap` past the last cycle."""
    xs = []
    for s in soak["samples"]:
        if s["at"] == "warm-up":
            xs.append(0.0)
        elif s["at"].startswith("cycle "):
            xs.append(float(s["at"].split()[1]))
        else:
            xs.append(soak["cycles"] + gap)
    return xs, soak["samples"]


def soak_figure(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gws = doc["gateways"]
    cycles = doc["params"]["cycles"]
    gap = max(cycles * 0.12, 1.0)
    fig, (rss, procs) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, constrained_layout=True)
    for name, g in gws.items():
        xs, samples = _soak_points(g["soak"], gap)
        style = {"color": COLORS.get(name), "marker": "o", "markersize": 4, "label": SHORT.get(name, name)}
        rss.plot(xs, [s["gateway_rss_mib"] for s in samples], **style)
        procs.plot(xs, [s["session_processes"] for s in samples], **style)
    waited = max((g["soak"]["samples"][-1].get("waited_s") or 0) for g in gws.values())
    for ax in (rss, procs):
        ax.axvspan(cycles, cycles + gap, color="0.9", zorder=0)
        ax.grid(True, color="0.85", linewidth=0.6)
    rss.text(cycles + gap / 2, rss.get_ylim()[1] * 0.5,
             f"grace window\n{doc['params']['grace']:g} s after\nthe last close;\nall reaped\nafter {waited:g} s",
             ha="center", va="center", fontsize=8, color="0.3")
    rss.set_ylabel("gateway process RSS (MiB)")
    rss.set_ylim(bottom=0)
    procs.set_ylabel("session processes\n(workers + slash workers)")
    procs.set_ylim(bottom=0)
    procs.set_xlabel("refresh cycles (connect → create → one prompt → abrupt close)")
    ticks = [0, *range(doc["params"]["sample_every"] * 2, cycles + 1, doc["params"]["sample_every"] * 2)]
    procs.set_xticks([*ticks, cycles + gap], [*map(str, ticks), "after\ngrace"])
    rss.legend(loc="upper left", bbox_to_anchor=(0.2, 0.6), fontsize=8)
    fig.suptitle(f"Refresh soak: {cycles} cycles, sampled every {doc['params']['sample_every']} "
                 f"({doc['machine']['date']}, commit {doc['machine']['commit']})", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def memory_figure(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gws = doc["gateways"]
    names = list(gws)
    n = doc["params"]["sessions"]
    fig, ax = plt.subplots(figsize=(9, 4.2), constrained_layout=True)
    width = 0.38
    for i, (key, label, hatch) in enumerate((("total_uss_mib_per_session", "USS (private)", ""),
                                             ("total_pss_mib_per_session", "PSS (shared pages split)", "//"))):
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        vals = [gws[nm]["per_session"][key] for nm in names]
        bars = ax.bar(xs, vals, width, color=[COLORS.get(nm) for nm in names], alpha=1.0 if i == 0 else 0.55,
                      hatch=hatch, edgecolor="white", label=label)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=8, padding=2)

    def tick(nm: str) -> str:
        per = gws[nm]["per_session"]
        procs = per["processes_per_session"]
        return (f"{SHORT.get(nm, nm)}\n{per['total_threads_per_session']:g} threads, {procs:g} "
                f"process{'' if procs == 1 else 'es'} per session")

    ax.set_xticks(range(len(names)), [tick(nm) for nm in names], fontsize=8)
    ax.set_ylabel("MiB per live session")
    ax.grid(True, axis="y", color="0.85", linewidth=0.6)
    ax.set_axisbelow(True)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="0.35", label="USS (private)"),
                       Patch(facecolor="0.35", alpha=0.55, hatch="//", edgecolor="white",
                             label="PSS (shared pages split)")], fontsize=8, loc="upper right")
    ax.set_title(f"Memory per session: {n} live attached sessions, one turn each; (gateway + all descendants, "
                 f"after − before) / {n}", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(doc: dict[str, Any], docs: Path = DOCS) -> list[Path]:
    """Both pictures into `docs`; ImportError (no matplotlib) is the caller's to report."""
    return [soak_figure(doc, docs / SOAK_PNG), memory_figure(doc, docs / MEMORY_PNG)]


def markdown() -> str:
    """The lines docs/performance.md shows above the comparison table."""
    return (f"![Refresh soak: gateway RSS and session processes per cycle, A against B and C, the grace window "
            f"shaded]({SOAK_PNG})\n\n![Memory per live session, USS and PSS, A, B and C]({MEMORY_PNG})")
