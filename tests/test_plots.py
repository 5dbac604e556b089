"""Issue 15: bench-compare's pictures, drawn from the committed bench/compare_hermes.json (nothing is run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAVED = ROOT / "bench" / "compare_hermes.json"


def test_plots_render_from_the_saved_run_and_the_doc_shows_them_above_the_table(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional `bench` extra (make bench-compare installs it)")
    from bench import compare_hermes, plots

    doc = json.loads(SAVED.read_text())
    for name, g in doc["gateways"].items():  # the soak is in the saved document, sample by sample
        assert [s["at"] for s in g["soak"]["samples"]][::len(g["soak"]["samples"]) - 1] == ["warm-up", "after grace"]
        assert all("gateway_rss_mib" in s and "session_processes" in s for s in g["soak"]["samples"]), name
    paths = plots.write(doc, tmp_path)
    assert [p.name for p in paths] == ["compare-soak.png", "compare-memory.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    section = compare_hermes.markdown(doc)
    assert section.index("(compare-soak.png)") < section.index("(compare-memory.png)") < section.index("| |")
    committed = (ROOT / "docs" / "performance.md").read_text()
    assert "(compare-soak.png)" in committed and (ROOT / "docs" / "compare-soak.png").exists()
    assert "(compare-memory.png)" in committed and (ROOT / "docs" / "compare-memory.png").exists()
