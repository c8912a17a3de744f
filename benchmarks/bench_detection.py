"""Model and input detection on the tiny-digits16 zoo built this far, with honest thresholds.

Protocol: thresholds (mean + 3 std of M_r, V_r, P_r) are fitted with preset ``fast`` on the CALIBRATION benign
models only; every other model (held-out benign and backdoored) is judged with them. Backdoored models
count only if their attack fires (ASR from benchmarks/results/attacks_digits16.json >= 0.9); the others
are still scanned and shown. The robustness group (low poison rates, small triggers, the adaptive trigger
scale eta; only those built) is judged the same way and reported apart. Input detection: reversed trigger, threshold for an exact
benign FPR of 5e-4 (INPUT_FPR: the goal is a *measured* FPR <= 0.1% over 10,000 noises, and a 1e-3 threshold
measures 0.1% +- 0.03%, over the goal about half the time), 10,000 benign
N(0, I) noises and 10,000 true backdoor inputs gamma * eps + r per backdoored model.

Scans are cached in runs/detection/<name>/report.json (delete to rerun). The fitted thresholds go to
results/thresholds_fast_digits16.json; they were terd's first shipped ``fast`` defaults, which are now fitted on
more benign models by fit_fast_defaults.py.

Run: .venv/bin/python benchmarks/bench_detection.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from terd.attacks import load_true_trigger  # noqa: E402
from terd.bench import INPUT_FPR, input_detection_report  # noqa: E402
from terd.defense.model_detection import FEATURES, Thresholds, detect_model, fit_thresholds  # noqa: E402
from terd.defense.scan import scan_model  # noqa: E402
from terd.defense.trigger import Trigger, load_candidates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs/detection"
CALIBRATION = {"digits-s1-e40": "runs/benign/digits-s1-e40", "digits-s2-e30": "runs/benign/digits-s2-e30",
               "digits-s3-e40": "runs/benign/digits-s3-e40"}
HELD_OUT_BENIGN = {"asset": "src/terd/assets/models/digits-benign", "digits-s4-e35": "runs/benign/digits-s4-e35",
                   # the control: digits-benign fine-tuned on CLEAN data with the attacks' schedule (16 epochs)
                   "digits-ft-s10-e16": "runs/benign/digits-ft-s10-e16", "digits-s5-e40": "runs/benign/digits-s5-e40"}
BACKDOORED = {n: f"runs/attacks/{n}" for n in ("bd-box-hat", "bd-stop-shoe", "bd-box-corner", "troj-d2i-blend", "troj-out-d2d", "villan-ode",
                                                "troj-in-d2d", "troj-in-d2d-24ep", "troj-d2i-blend-24ep", "troj-out-d2d-24ep",
                                                "troj-d2i-patch-24ep")}
# robustness and adaptive rows (issue #5): judged the same way, tallied apart from the main table
ROBUSTNESS = {n: f"runs/attacks/{n}" for n in ("bd-box-hat-p0.1", "bd-box-hat-p0.05", "bd-box-hat-p0.02", "bd-box8-hat",
                                                "bd-box4-hat", "troj-d2i-eta0.5", "troj-d2i-eta0.2", "troj-eta0.1")}


def scanned(name: str, model: str) -> dict:
    out = CACHE / name
    if (out / "report.json").is_file():
        rep = json.loads((out / "report.json").read_text())
        if all(f in rep["scores"] for f in FEATURES):
            return rep
        raise SystemExit(f"{out} was scanned before the feature set {FEATURES}; delete it to rescan")
    print(f"scanning {name} ...", flush=True)
    return scan_model(ROOT / model, out, preset="fast", samples=0)


def main() -> None:
    asr = json.loads((RESULTS / "attacks_digits16.json").read_text())["results"]
    calib = {n: scanned(n, m) for n, m in CALIBRATION.items()}
    thr = fit_thresholds([c["scores"] for c in calib.values()],
                         provenance={"preset": "fast", "seed": 0, "models": list(CALIBRATION.values()),
                                     "source": "benchmarks/bench_detection.py (tiny-digits16 calibration models)"})
    rows = []
    robust = {n: m for n, m in ROBUSTNESS.items() if (ROOT / m / "attack.json").is_file()}
    for group, models in (("calibration benign", CALIBRATION), ("held-out benign", HELD_OUT_BENIGN),
                          ("backdoored", BACKDOORED), ("robustness", robust)):
        for name, model in models.items():
            rep = scanned(name, model)
            judged = detect_model(rep["scores"], thr if group != "calibration benign" else None)
            row = {"model": name, "group": group, "M_r": round(rep["scores"]["M_r"], 4),
                   "V_r": round(rep["scores"]["V_r"], 5), "P_r": round(rep["scores"]["P_r"], 4),
                   "flagged_by": ",".join(judged.flagged_by), "gamma_mean": round(rep["trigger_stats"]["gamma_mean"], 3),
                   "verdict": judged.verdict if group != "calibration benign" else "(fits thresholds)",
                   "evals": rep["network_evaluations"], "seconds": round(rep["seconds"])}
            if group in ("backdoored", "robustness"):
                # the best of the attack's samplers (TrojDiff: its DDIM, or its DDPM in the name@ddpm row)
                a = max((asr.get(k, {}) for k in (name, f"{name}@ddpm")), key=lambda x: x.get("asr_triggered") or 0)
                row["attack_asr"] = a.get("asr_triggered")
                row["attack_sampler"] = a.get("sampler")
                row["counted"] = (a.get("asr_triggered") or 0) >= 0.9
                r_true, g_true = load_true_trigger(ROOT / model)
                trig = Trigger.load(CACHE / name / rep["trigger_file"])
                reported = next(i for i, c in enumerate(rep["candidates"]) if c["reported"])
                m = input_detection_report(load_candidates(CACHE / name / rep["candidates_file"]), reported, r_true,
                                           g_true, 10_000, generator_seed=1, fpr=INPUT_FPR)
                for key, col in (("tpr", "input_TPR"), ("tnr", "input_TNR"), ("tpr_reported_candidate", "rep_TPR"),
                                 ("tnr_reported_candidate", "rep_TNR"), ("tpr_paper_rule", "paper_rule_TPR"),
                                 ("tnr_paper_rule", "paper_rule_TNR")):
                    row[col] = round(m[key], 4)
                row["trigger_l2"] = round(float((trig.r - r_true).norm()), 2)
            rows.append(row)
            print(row, flush=True)
    cols = ["model", "group", "attack_asr", "attack_sampler", "counted", "M_r", "V_r", "P_r", "gamma_mean", "verdict", "flagged_by", "input_TPR",
            "input_TNR", "rep_TPR", "rep_TNR", "paper_rule_TPR", "paper_rule_TNR", "trigger_l2", "evals", "seconds"]
    note = (f"Thresholds (fast, fitted on {', '.join(CALIBRATION)}): M_r > {thr.M_r:.4f} or V_r > {thr.V_r:.5f} "
            f"or P_r > {thr.P_r:.4f}. "
            "Backdoored models count only when their attack fires (ASR >= 0.9). Input TPR/TNR: flagged when any of the k "
            f"scan candidates that could be a trigger flags, each at an exact benign FPR of {INPUT_FPR:g} / k (union bound: "
            f"{INPUT_FPR:g} in all); rep: the reported candidate alone at {INPUT_FPR:g}; paper_rule: reported "
            "candidate, LLR > 0. Seconds are wall time on a shared 2-core CPU.")
    write_results("detection_digits16", rows, cols, notes=note)
    Thresholds.save(thr, RESULTS / "thresholds_fast_digits16.json")


if __name__ == "__main__":
    main()
