"""How long the demo (`make demo`, the main job on the embedded default) takes on this machine; target 180 s.

Runs terd's demo (both shipped models scanned with preset fast, then the input check) REPEATS times in fresh
temporary directories, in this process with torch's default threads (as `terd demo` runs), and records the
demo's own `seconds` (summary.json), each scan's reversion seconds, and whether both verdicts were right.
Interpreter start-up and imports (a few seconds) are not included.
Run: .venv/bin/python benchmarks/bench_demo_time.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.demo import run_demo  # noqa: E402

TARGET_S = 180.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_demo(Path(tmp) / "demo", echo=lambda _: None)
            scans = {role: json.loads(Path(m["report"]).read_text())["seconds"] for role, m in summary["models"].items()}
        rows.append({"run": i + 1, "demo_seconds": summary["seconds"], "benign_scan_s": round(scans["benign"], 1),
                     "backdoored_scan_s": round(scans["backdoored"], 1), "both_correct": summary["correct"]})
        print(rows[-1], flush=True)
    med = statistics.median(r["demo_seconds"] for r in rows)
    rows.append({"run": "median", "demo_seconds": round(med, 1), "both_correct": all(r["both_correct"] for r in rows),
                 "within_target": med <= TARGET_S})
    write_results("demo_time", rows, ["run", "demo_seconds", "benign_scan_s", "backdoored_scan_s", "both_correct",
                                      "within_target"],
                  notes=(f"`terd demo` ({args.repeats} runs, default torch threads, fresh output directories). "
                         "demo_seconds: the demo's own clock (summary.json), without interpreter start-up; "
                         "*_scan_s: each scan's reversion seconds (report.json). Target: "
                         f"{TARGET_S:.0f} s on 2 CPU cores."))


if __name__ == "__main__":
    main()
