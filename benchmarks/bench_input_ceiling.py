"""How close terd's input detection comes to the best any detector could do, per backdoored bench model.

The ceiling is the TPR of the model's TRUE trigger's own likelihood-ratio test at the same benign
false-positive rate: by the Neyman-Pearson lemma no test of x_T alone catches more (closed form, no sampling;
``terd.defense.best_possible_tpr``). It is given at the benches' budget (0.0005, so measured FPRs stay <= 0.1%)
and at 0.001 (the goal's FPR itself). The terd-fast column is the bench's measured rate (10,000 true inputs).

Needs the bench outputs (runs/bench-digits16, runs/bench-photos32-e24, runs/bench-photos32-e24b) and their caches.
Run: .venv/bin/python benchmarks/bench_input_ceiling.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.bench import INPUT_FPR, input_tpr_bound  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = [("runs/bench-digits16", "runs/zoo-digits16"), ("runs/bench-photos32-e24", "runs/zoo-photos32"),
        ("runs/bench-photos32-e24b", "runs/zoo-photos32")]
GOAL_FPR, GOAL_TPR = 1e-3, 0.999


def main() -> None:
    rows, seen = [], set()
    for bench, cache in RUNS:
        for f in sorted((ROOT / bench / "rows").glob("*.json")):
            row = json.loads(f.read_text())["row"]
            inp = row.get("defenses", {}).get("terd-fast", {}).get("input_detection")
            if not row["backdoored"] or inp is None:
                continue
            key = row["id"]
            rows = [r for r in rows if r["model"] != key]  # a later run of the same model replaces the earlier
            seen.add(key)
            at_budget = input_tpr_bound(ROOT / cache / key, INPUT_FPR)
            at_goal = input_tpr_bound(ROOT / cache / key, GOAL_FPR)
            rows.append({"model": key, "bench": bench, "asr": row.get("asr"), "fires": row.get("asr", 0) >= 0.9,
                         "terd_fast_tpr": inp["tpr"], "ceiling_at_budget": at_budget, "ceiling_at_goal_fpr": at_goal,
                         "goal_reachable": at_goal >= GOAL_TPR})
            print(rows[-1], flush=True)
    write_results("input_ceiling", rows, ["model", "bench", "asr", "fires", "terd_fast_tpr", "ceiling_at_budget",
                                          "ceiling_at_goal_fpr", "goal_reachable"],
                  notes=f"ceiling: the TPR of the true trigger's own likelihood-ratio test (Neyman-Pearson: no "
                        f"detector of x_T alone does better) at FPR {INPUT_FPR:g} (the benches' budget) and "
                        f"{GOAL_FPR:g} (the goal's FPR). goal_reachable: the ceiling at {GOAL_FPR:g} is >= "
                        f"{GOAL_TPR} (the goal's TPR). terd_fast_tpr: measured by the bench on 10,000 true inputs "
                        "at the budget. Rows of models whose attack does not fire (fires = False) are not counted "
                        "by the bench.")


if __name__ == "__main__":
    main()
