"""What the fixed-gamma descent start costs a `fast` reversion: with and without it, timed interleaved.

The descent adds 40 iterations of one candidate (1,312 evaluations, 5.8% of a scan's 22,784). This times a full
`fast` reversion (patch probe off in both) of the demo's benign model with ``descent_iters`` 40 and 0, in turn per
repeat so machine drift hits both alike, and reports medians and their ratio. The line point wins on this model
(descent_start.md), so both runs return the same trigger; that is checked.

Run: .venv/bin/python benchmarks/bench_descent_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds_interleaved, write_results  # noqa: E402

from terd.defense.reversion import get_config, reverse_trigger  # noqa: E402
from terd.models.loading import load_denoiser  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "src/terd/assets/models/demo-benign"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    den = load_denoiser(MODEL)
    with_d = replace(get_config("fast"), patch_probe=False)
    without = replace(with_d, descent_iters=0)
    out = {}

    def run(name: str, cfg) -> None:  # noqa: ANN001
        out[name] = reverse_trigger(den, cfg, seed=0)

    t_with, t_without = median_seconds_interleaved([lambda: run("with", with_d), lambda: run("without", without)],
                                                   repeats=args.repeats)
    same = all(torch.equal(a.r, b.r) and torch.equal(a.gamma, b.gamma)
               for a, b in zip(out["with"].candidate_triggers, out["without"].candidate_triggers, strict=True))
    rows = [{"model": MODEL.name, "descent_iters": 40, "median_s": round(t_with, 2),
             "evaluations": out["with"].network_evaluations, "same_trigger": same},
            {"model": MODEL.name, "descent_iters": 0, "median_s": round(t_without, 2),
             "evaluations": out["without"].network_evaluations, "same_trigger": same}]
    for r in rows:
        print(r, flush=True)
    write_results("descent_cost", rows, ["model", "descent_iters", "median_s", "evaluations", "same_trigger"],
                  notes=f"`fast` reversion of demo-benign, patch probe off, seed 0, medians of {args.repeats} runs "
                        f"timed in turn (plus one untimed warm-up each): with / without descent = "
                        f"{t_with / t_without:.3f}x time, "
                        f"{out['with'].network_evaluations / out['without'].network_evaluations:.3f}x evaluations.")


if __name__ == "__main__":
    main()
