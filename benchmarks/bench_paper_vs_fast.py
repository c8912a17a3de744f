"""`fast` vs `paper` reversion on the same model, in one run: evaluations, wall time, features, trigger fidelity.

Issue #4 asks that `fast` reach the same decisions as the reference schedule with >= 10x fewer network
evaluations, and that the wall-time ratio be measured in one run on the same model. This script runs both
presets back to back in one process (same seed, same thread count) on each model given and records:
M_r / V_r of each, network evaluations, seconds, their ratios, l2 of the reversed r to the true trigger
and input-detection TPR/TNR of each reversed trigger (attacked models), and `fast`'s verdict under the
shipped `fast` thresholds. The table judges `paper`'s features with the shipped `paper` thresholds
(bench_paper_thresholds.py: benign seeds 1, 2, 3 and 5) when they exist.

One file per model under benchmarks/results/paper_vs_fast/ (so models can run in parallel processes);
the summary table benchmarks/results/paper_vs_fast.md is rebuilt from all of them after each model.

Run: .venv/bin/python benchmarks/bench_paper_vs_fast.py MODEL_DIR [MODEL_DIR ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_defense import run_model  # noqa: E402
from common import RESULTS, machine  # noqa: E402

from terd.defense.calibration import default_thresholds  # noqa: E402
from terd.defense.model_detection import FEATURES, detect_model  # noqa: E402
from terd.defense.reversion import get_config  # noqa: E402

PER_MODEL = RESULTS / "paper_vs_fast"
KEEP = ("M_r", "V_r", "P_r", "gamma_mean", "network_evaluations", "seconds", "trigger_l2_to_true", "candidates")


def compare(path: Path, seed: int) -> dict:
    t0 = time.perf_counter()
    runs = {name: run_model(path, get_config(name), seed) for name in ("fast", "paper")}
    fast, paper = runs["fast"], runs["paper"]
    row = {"model": fast["model"], "attack": fast.get("attack", {}).get("attack", "none"),
           "machine": machine(), "seed": seed, "total_seconds": round(time.perf_counter() - t0, 1),
           "evaluation_ratio": round(paper["network_evaluations"] / fast["network_evaluations"], 1),
           "wall_ratio": round(paper["seconds"] / fast["seconds"], 1)}
    for name, r in runs.items():
        row[name] = {k: r[k] for k in KEEP if k in r}
        det = r["input_detection"]
        row[name]["input_tpr"] = det.get("tpr")
        row[name]["input_tnr"] = det["tnr"]
    return row


def verdict(features: dict, preset: str) -> str:
    """The preset's shipped thresholds on the features the row saved (rows made before P_r existed lack it)."""
    return detect_model({k: features[k] for k in FEATURES if features.get(k) is not None},
                        default_thresholds(preset)).verdict


def summary_table() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(PER_MODEL.glob("*.json"))]
    lines = ["# paper_vs_fast", "",
             "Both presets on the same model in one process, one after the other (same seed; torch threads per "
             "row). Verdicts: each preset's shipped thresholds (src/terd/defense/default_thresholds.json) on the "
             "features the row saved, recomputed whenever the table is written; rows made before P_r existed are "
             "judged on M_r and V_r. Input TPR: the reported trigger's own detector on its true backdoor inputs.", "",
             "| model | attack | threads | M_r fast / paper | V_r fast / paper | P_r fast / paper | "
             "l2 to true r fast / paper | input TPR fast / paper | evals fast / paper (ratio) | "
             "seconds fast / paper (ratio) | verdict fast / paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, p = r["fast"], r["paper"]

        def pair(key: str, fmt: str, f=f, p=p) -> str:
            return " / ".join(format(x[key], fmt) if x.get(key) is not None else "-" for x in (f, p))

        lines.append(f"| {r['model']} | {r['attack']} | {r['machine']['threads']} | {pair('M_r', '.4f')} | "
                     f"{pair('V_r', '.4f')} | {pair('P_r', '.4f')} | "
                     f"{pair('trigger_l2_to_true', '.2f')} | {pair('input_tpr', '.3f')} | "
                     f"{f['network_evaluations']} / {p['network_evaluations']} ({r['evaluation_ratio']}x) | "
                     f"{f['seconds']:.0f} / {p['seconds']:.0f} ({r['wall_ratio']}x) | "
                     f"{verdict(f, 'fast')} / {verdict(p, 'paper')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path, help="none: only rewrite the table from the saved rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    PER_MODEL.mkdir(parents=True, exist_ok=True)
    for m in args.models:
        if not (m / "model_index.json").is_file():
            raise SystemExit(f"{m}: not a model directory (no model_index.json)")
        print(f"fast and paper on {m} ...", file=sys.stderr, flush=True)
        row = compare(m.resolve(), args.seed)
        (PER_MODEL / f"{m.resolve().name}.json").write_text(json.dumps(row, indent=2) + "\n")
        (RESULTS / "paper_vs_fast.md").write_text(summary_table())
        print(summary_table(), flush=True)
    if not args.models:
        (RESULTS / "paper_vs_fast.md").write_text(summary_table())


if __name__ == "__main__":
    main()
