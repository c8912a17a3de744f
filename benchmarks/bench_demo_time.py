"""How long the demo (`make demo`, the main job on the embedded default) takes on this machine; target 180 s.

Runs terd's demo (both shipped models scanned with preset fast, then the input check) REPEATS times in fresh
temporary directories for each WORKERS setting: 1 = the two scans in turn in this process at torch's default
threads (the demo before 2026-12-03), 2 = side by side in two processes at cores/2 threads each (the default
since). Records the demo's own `seconds` (summary.json), each scan's reversion seconds, and whether both
verdicts were right. The settings alternate run by run, so a drift in the machine's speed hits both alike.
Interpreter start-up and imports (a few seconds) are not included. This machine's speed drifts by up to ~2x
between spells, so every run is kept: a new run's rows are added to the ones already recorded (each tagged with
when it ran), and the table gives each recording's median and the median and range over all of them.
Run: .venv/bin/python benchmarks/bench_demo_time.py [--repeats 2] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_results  # noqa: E402

from terd.demo import run_demo  # noqa: E402

TARGET_S = 180.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=_worker_settings, default="1,2",
                    help="comma-separated demo --workers settings to time")
    args = ap.parse_args()
    settings = args.workers
    when = machine()["date"]
    rows = []
    for i in range(args.repeats):
        for workers in settings:
            with tempfile.TemporaryDirectory() as tmp:
                summary = run_demo(Path(tmp) / "demo", workers=workers, echo=lambda _: None)
                scans = {role: json.loads(Path(m["report"]).read_text())["seconds"]
                         for role, m in summary["models"].items()}
            rows.append({"recorded": when, "workers": summary["workers"], "run": i + 1,
                         "demo_seconds": summary["seconds"], "benign_scan_s": round(scans["benign"], 1),
                         "backdoored_scan_s": round(scans["backdoored"], 1), "both_correct": summary["correct"]})
            print(rows[-1], flush=True)
    runs = _earlier_runs() + rows
    table = []
    for rec, workers in dict.fromkeys((r["recorded"], r["workers"]) for r in runs):
        mine = [r for r in runs if (r["recorded"], r["workers"]) == (rec, workers)]
        med = statistics.median(r["demo_seconds"] for r in mine)
        table += mine + [{"recorded": rec, "workers": workers, "run": "median", "demo_seconds": round(med, 1),
                          "both_correct": all(r["both_correct"] for r in mine), "within_target": med <= TARGET_S}]
    for workers in sorted({r["workers"] for r in runs}):
        secs = [r["demo_seconds"] for r in runs if r["workers"] == workers]
        table.append({"recorded": "all recordings", "workers": workers,
                      "run": f"median (range {min(secs):.0f}-{max(secs):.0f})",
                      "demo_seconds": round(statistics.median(secs), 1),
                      "both_correct": all(r["both_correct"] for r in runs if r["workers"] == workers),
                      "within_target": f"{sum(s <= TARGET_S for s in secs)} of {len(secs)} runs"})
    write_results("demo_time", table, ["recorded", "workers", "run", "demo_seconds", "benign_scan_s",
                                       "backdoored_scan_s", "both_correct", "within_target"],
                  notes=("`terd demo` (fresh output directories), every recording kept. workers 1: the scans in "
                         "turn at torch's default threads (every recording before 2026-12-03 19:58 UTC); 2: side by "
                         "side, one thread each (the default now). "
                         "demo_seconds: the demo's own clock (summary.json), without interpreter start-up; "
                         "*_scan_s: each scan's reversion seconds (report.json). Target: "
                         f"{TARGET_S:.0f} s on 2 CPU cores."))


def _worker_settings(text: str) -> list[int]:
    """'1,2' -> [1, 2]; anything else is an argparse error (one line, exit 2)."""
    try:
        settings = [int(w) for w in text.split(",")]
    except ValueError:
        settings = []
    if not settings or min(settings) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated worker counts >= 1, got {text!r}")
    return settings


def _earlier_runs() -> list[dict]:
    """The single runs already recorded (rows without a run number are the summaries, rebuilt each time).

    Rows recorded before the demo could run its scans side by side lack ``workers``: they ran in turn (1).
    """
    path = RESULTS / "demo_time.json"
    if not path.is_file():
        return []
    return [{"workers": 1, **r} for r in json.loads(path.read_text())["rows"] if isinstance(r.get("run"), int)]


if __name__ == "__main__":
    main()
