"""The README's results block is what benchmarks/readme_results.py renders from the committed bench runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _renderer():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "benchmarks" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_block_is_current():
    rr = _renderer()
    assert rr.main(["--check"]) == 0, "run: .venv/bin/python benchmarks/readme_results.py"


def test_results_block_reports_every_listed_bench_row():
    rr = _renderer()
    block = rr.render()
    import json

    for label, name in rr.BENCHES:
        table = json.loads((rr.RESULTS / name / "results.json").read_text())["summary"]["table"]
        for row in table:
            assert f"| {label} | {row['defense']} | {row['family']} | {row['models']} |" in block
    assert block.startswith(rr.BEGIN) and block.endswith(rr.END)


def test_splice_needs_the_markers():
    rr = _renderer()
    with pytest.raises(SystemExit, match="markers"):
        rr.splice("# no markers here\n", rr.render())
    spliced = rr.splice(f"a\n{rr.BEGIN}\nold\n{rr.END}\nb\n", "NEW")
    assert spliced == "a\nNEW\nb\n"


def test_run_time_line_counts_models_no_recorded_run_evaluated():
    rr = _renderer()
    meta = {"runs": [{"seconds": 1522.2, "evaluated": ["c"]}, {"seconds": 0.5, "evaluated": []}]}
    assert rr._seconds(meta, ["a", "b", "c"]) == (
        "runs recorded: 1,522 s (and 2 models evaluated by runs that recorded no time: interrupted, or from before run times were kept)")
    assert rr._seconds(meta, ["c"]) == "runs recorded: 1,522 s"
    assert rr._seconds({"seconds": 9.0, "reused_rows": ["a"]}, ["a"]).startswith("no run time recorded")
