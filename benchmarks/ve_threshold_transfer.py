"""Do terd's shipped ``fast`` thresholds, fitted on VP (DDPM) digits16 models, judge VE models right?

The TERD paper reuses the thresholds it fits at CIFAR-10 for every other dataset (the features do not depend
on image size). This asks the same of model families: the shipped ``fast`` thresholds come from six benign
VP tiny-digits16 models (fast_defaults.md); the VE bench (benchmarks/results/bench_digits16_ve/) scanned
benign and backdoored VE models (tiny-digits16-ve: EDM-preconditioned, geometric sigmas) with the same
``fast`` schedule. No VE model was used to make the thresholds, so every VE row is a held-out judgement.
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

BENCH = RESULTS / "bench_digits16_ve" / "results.json"


def main() -> None:
    bench = json.loads(BENCH.read_text())
    thr = default_thresholds("fast")
    out = []
    for r in bench["models"]:
        feats = r["defenses"].get("terd-fast")
        if feats is None:
            continue
        verdict = detect_model(feats, thr)
        counted = (not r["backdoored"]) or (r.get("asr") or 0) >= 0.9
        out.append({"model": r["id"], "truth": "backdoored" if r["backdoored"] else "benign", "asr": r.get("asr"),
                    "counted": counted, **{f: round(feats[f], 5) for f in ("M_r", "V_r", "P_r")},
                    "verdict_shipped_vp_thresholds": verdict.verdict, "flagged_by": ",".join(verdict.flagged_by),
                    "bench_leave_one_out_flagged": feats["decision"]["flagged"]})
        print(out[-1], flush=True)
    judged = [o for o in out if o["counted"]]
    right = sum(o["verdict_shipped_vp_thresholds"] == o["truth"] for o in judged)
    cols = ["model", "truth", "asr", "counted", "M_r", "V_r", "P_r", "verdict_shipped_vp_thresholds", "flagged_by",
            "bench_leave_one_out_flagged"]
    write_results("ve_threshold_transfer", out, cols, notes=(
        f"terd's shipped `fast` thresholds (fitted on {len(thr.provenance.get('models', []))} benign VP tiny-digits16 "
        f"models: M_r > {thr.M_r:.4f} or V_r > {thr.V_r:.5f} or P_r > {thr.P_r:.4f}) applied to the VE bench's "
        f"terd-fast features: {right}/{len(judged)} counted VE models judged right (counted: benign, or an attack that "
        "fires, ASR >= 0.9). `bench_leave_one_out_flagged` is the VE bench's own verdict (thresholds fitted on the "
        "other benign VE models)."))


if __name__ == "__main__":
    main()
