"""Which scan candidates input detection should use: the numbers behind terd.defense.implicated.

Read from zoo-tiny's recorded bench (rows, saved candidates and leave-one-out decisions; closed form, no network):

1. every benign model's reversion candidates: the share of their OWN inputs N(r, gamma^2) each would catch at an
   even share of the 5e-4 budget -- the "could be a trigger" screen's statistic (kept at >= 0.5);
2. every backdoored model the patch probe's features flagged: per reversion candidate, r and gamma on the probe's
   window (where the trigger is), its features read outside that window against the model's cuts, and whether the
   rule implicates it; then input TPR with every screened candidate against the verdict's choice (the report's
   `input_detection`, measured on 10,000 + 10,000 noises).

Needs runs/bench-tiny (terd bench --zoo benchmarks/zoo-tiny.yaml --out runs/bench-tiny ...: its rows/ and
triggers/) and the committed reports bench_tiny/ and bench_tiny_p32/ (their decisions and cuts).
Run: .venv/bin/python benchmarks/bench_candidate_choice.py   -> results/candidate_choice.{json,md}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.defense.implicated import features_outside, implicated_candidates, trigger_window  # noqa: E402
from terd.defense.input_detection import InputDetector  # noqa: E402
from terd.defense.model_detection import KL_FEATURES  # noqa: E402
from terd.defense.trigger import load_candidates  # noqa: E402
from terd.rates import INPUT_FPR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRIGGERS = ROOT / "runs/bench-tiny/triggers"
REPORTS = ("bench_tiny", "bench_tiny_p32")
DEFENSE = "terd-fast"


def main() -> None:
    models = [m for name in REPORTS for m in json.loads((ROOT / "benchmarks/results" / name / "results.json")
                                                          .read_text())["models"]]
    rows = []
    for m in models:
        path = TRIGGERS / f"{m['id']}--{DEFENSE}.candidates.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run the zoo-tiny bench into runs/bench-tiny first")
        d = m["defenses"][DEFENSE]
        cands, dec, probe = load_candidates(path), d["decision"], (d.get("patch_probe") or {}).get("candidate_index")
        reversion = [i for i in range(len(cands)) if i != probe]
        own = [round(InputDetector(cands[i], fpr=INPUT_FPR / len(cands)).expected_tpr(), 3) for i in reversion]
        row = {"model": m["id"], "backdoored": m["backdoored"], "own-input rate per reversion candidate": own}
        implicated = implicated_candidates(cands, dec.get("cuts"), probe, d) if dec.get("flagged") else []
        if m["backdoored"] and probe is not None and implicated:
            window, cuts = trigger_window(cands[probe]), dec["cuts"]
            on = [(round(float(cands[i].r[window].mean()), 2), round(float(cands[i].gamma[window].mean()), 2))
                  for i in reversion]
            outside = [features_outside(cands[i], window) for i in reversion]
            row |= {"(r, gamma) on the probe's window": on,
                    "outside the window, feature / cut": [
                        {f: round(o[f] / cuts[f], 2) for f in KL_FEATURES if f in cuts} for o in outside],
                    "implicated": implicated,
                    "input TPR, every screened candidate": d["input_detection"]["tpr"],
                    "input TPR, the verdict's choice": d["input_detection"]["by_verdict"]["tpr"],
                    "input TNR, the verdict's choice": d["input_detection"]["by_verdict"]["tnr"],
                    "ceiling": m.get("input_tpr_bound")}
        rows.append(row)
        print(row, flush=True)
    cols = ["model", "backdoored", "own-input rate per reversion candidate", "(r, gamma) on the probe's window",
            "outside the window, feature / cut", "implicated", "input TPR, every screened candidate",
            "input TPR, the verdict's choice", "input TNR, the verdict's choice", "ceiling"]
    note = (f"Own-input rate: the share of a candidate's own inputs its detector catches at FPR {INPUT_FPR:g} / k "
            "(k candidates; closed form). Patch rows: models flagged through the patch probe (L_p or W_p over its "
            "leave-one-out cut); the rule keeps the probe's candidate and reversion candidates whose M_r or V_r, "
            "read outside the probe's window, cross their cuts (P_r / cut is shown too: it is not used there). "
            "Input rates from the reports (10,000 benign + 10,000 backdoor noises per model).")
    write_results("candidate_choice", rows, cols, notes=note)


if __name__ == "__main__":
    main()
