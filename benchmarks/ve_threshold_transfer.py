"""Do terd's shipped ``fast`` thresholds, fitted on VP (DDPM) digits16 models, judge VE models right?

The TERD paper reuses the thresholds it fits at CIFAR-10 for every other dataset (the features do not depend
on image size). This asks the same of model families: the shipped ``fast`` thresholds come from six benign
VP tiny-digits16 models (fast_defaults.md); the VE benches (benchmarks/results/bench_digits16_ve/: EDM-
preconditioned tiny-digits16-ve; bench_digits16_ncsn/: the NCSN score network tiny-digits16-ncsn) scanned
benign and backdoored VE models with the same ``fast`` schedule. No VE model was used to make the thresholds, so every VE row is a held-out judgement.
No model is scanned here: every feature comes from the committed VE bench results.

Run: .venv/bin/python benchmarks/ve_threshold_transfer.py → ve_threshold_transfer.md / .json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from terd.defense.calibration import default_thresholds  # noqa: E402
from terd.defense.model_detection import detect_model  # noqa: E402

BENCHES = {"edm": RESULTS / "bench_digits16_ve" / "results.json", "ncsn": RESULTS / "bench_digits16_ncsn" / "results.json"}


def main() -> None:
    thr = default_thresholds("fast")
    out = []
    rows = [(fmt, r) for fmt, path in BENCHES.items() for r in json.loads(path.read_text())["models"]]
    for fmt, r in rows:
        feats = r["defenses"].get("terd-fast")
        if feats is None:
            continue
        verdict = detect_model(feats, thr)
        counted = (not r["backdoored"]) or (r.get("asr") or 0) >= 0.9
        out.append({"model": r["id"], "format": fmt, "truth": "backdoored" if r["backdoored"] else "benign", "asr": r.get("asr"),
                    "counted": counted, **{f: round(feats[f], 5) for f in ("M_r", "V_r", "P_r")},
                    "verdict_shipped_vp_thresholds": verdict.verdict, "flagged_by": ",".join(verdict.flagged_by),
                    "bench_leave_one_out_flagged": feats["decision"]["flagged"]})
        print(out[-1], flush=True)
    judged = [o for o in out if o["counted"]]
    right = sum(o["verdict_shipped_vp_thresholds"] == o["truth"] for o in judged)
    cols = ["model", "format", "truth", "asr", "counted", "M_r", "V_r", "P_r", "verdict_shipped_vp_thresholds", "flagged_by",
            "bench_leave_one_out_flagged"]
    write_results("ve_threshold_transfer", out, cols, notes=(
        f"terd's shipped `fast` thresholds (fitted on {len(thr.provenance.get('models', []))} benign VP tiny-digits16 "
        f"models: M_r > {thr.M_r:.4f} or V_r > {thr.V_r:.5f} or P_r > {thr.P_r:.4f}) applied to the VE benches' "
        f"terd-fast features: {right}/{len(judged)} counted VE models judged right (counted: benign, or an attack that "
        "fires, ASR >= 0.9); every benign one is flagged: "
        f"{sum(o['truth'] == 'benign' and o['verdict_shipped_vp_thresholds'] == 'backdoored' for o in out)}/"
        f"{sum(o['truth'] == 'benign' for o in out)}. `bench_leave_one_out_flagged` is the VE bench's own verdict "
        "(thresholds fitted on the other benign models of the same bench)."))


if __name__ == "__main__":
    main()
