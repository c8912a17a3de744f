"""Input detection per reversal candidate, from the candidates the two `terd bench` runs saved.

For every backdoored model of the digits16 and photos32 benches: each candidate's gamma mean and ||r||, its
own-input rate at an even share of the FPR budget (the "could be a trigger" test of CandidateSetDetector),
whether the set keeps it, and the EXACT rate at which it flags the model's true backdoor inputs
N(r_true, gamma_true^2) — alone at the full budget, and at an even share (what a plain union over all
candidates would give). Closed form (Imhof), no sampling. Benign models: the own-input rates only.

Needs the bench outputs (runs/bench-digits16, runs/bench-photos32-e24b) and their model caches.
Run: .venv/bin/python benchmarks/bench_candidate_set.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.attacks import load_true_trigger  # noqa: E402
from terd.bench import INPUT_FPR  # noqa: E402
from terd.defense.input_detection import CandidateSetDetector, InputDetector  # noqa: E402
from terd.defense.trigger import load_candidates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = [("runs/bench-digits16", "runs/zoo-digits16"), ("runs/bench-photos32-e24b", "runs/zoo-photos32")]


def main() -> None:
    rows = []
    for bench, cache in RUNS:
        for f in sorted((ROOT / bench / "triggers").glob("*--terd-fast.candidates.safetensors")):
            model = f.name.split("--")[0]
            cands = load_candidates(f)
            kept = CandidateSetDetector(cands, fpr=INPUT_FPR).kept
            attacked = (ROOT / cache / model / "true_trigger.safetensors").is_file()
            r_true, g_true = load_true_trigger(ROOT / cache / model) if attacked else (None, None)
            for i, c in enumerate(cands):
                even = InputDetector(c, fpr=INPUT_FPR / len(cands))
                row = {"model": model, "candidate": i, "gamma_mean": round(float(c.gamma.mean()), 3),
                       "r_norm": round(float(c.r.norm()), 2), "own_input_rate_even_share": round(even.expected_tpr(), 4),
                       "kept": i in kept}
                if attacked:
                    row["true_input_rate_alone"] = round(InputDetector(c, fpr=INPUT_FPR).detection_rate(r_true, g_true), 5)
                    row["true_input_rate_even_share"] = round(even.detection_rate(r_true, g_true), 5)
                rows.append(row)
                print(row, flush=True)
    write_results("candidate_set", rows, ["model", "candidate", "gamma_mean", "r_norm", "own_input_rate_even_share",
                                          "kept", "true_input_rate_alone", "true_input_rate_even_share"],
                  notes=f"FPR budget {INPUT_FPR:g} (the benches'); even share = budget / number of candidates. "
                        "kept: the candidate-set detector keeps candidates whose own-input rate at an even share is "
                        ">= 0.5 and splits the budget over those. true_input_rate: exact rate at which the candidate's "
                        "detector flags the model's true backdoor inputs (benign models: none).")


if __name__ == "__main__":
    main()
