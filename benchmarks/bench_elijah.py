"""Elijah (the baseline) vs terd `fast` on the same tiny-digits16 models, under the same honest protocol.

Same model groups as bench_detection.py: Elijah's threshold (benign-only, mean - 3 std of the generation
spread) is fitted on the CALIBRATION benign models only; the held-out benign and the backdoored models are
judged with it. Backdoored models count only if their attack fires (ASR >= 0.9, from
attacks_digits16.json). terd's verdicts: bench_detection.py's cached scans judged with its thresholds (run it first).

Elijah scans are cached in runs/detection-elijah/<name>.json (delete one to rerun it).

Run: .venv/bin/python benchmarks/bench_elijah.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_detection import BACKDOORED, CACHE, CALIBRATION, HELD_OUT_BENIGN, ROBUSTNESS, ROOT  # noqa: E402
from common import RESULTS, write_results  # noqa: E402

from terd.attacks import load_true_trigger  # noqa: E402
from terd.defense.elijah import elijah_scan, fit_spread_threshold  # noqa: E402
from terd.defense.model_detection import Thresholds, detect_model  # noqa: E402
from terd.models import load_denoiser  # noqa: E402

ELIJAH_CACHE = ROOT / "runs/detection-elijah"
GROUPS = (("calibration benign", CALIBRATION), ("held-out benign", HELD_OUT_BENIGN), ("backdoored", BACKDOORED),
          ("robustness", {n: m for n, m in ROBUSTNESS.items() if (CACHE / n / "report.json").is_file()}))


def elijah_row(name: str, model: str, backdoored: bool) -> dict:
    out = ELIJAH_CACHE / f"{name}.json"
    if out.is_file():
        return json.loads(out.read_text())
    print(f"elijah on {name} ...", flush=True)
    res = elijah_scan(load_denoiser(ROOT / model), seed=0)
    row = {"spread": res.spread, "clean_spread": res.clean_spread, "evals": res.network_evaluations,
           "seconds": round(res.seconds, 1), "loss": res.loss}
    if backdoored:
        r_true, _ = load_true_trigger(ROOT / model)
        row["trigger_l2"] = float((res.tau - r_true).norm())
    ELIJAH_CACHE.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    return row


def main() -> None:
    asr = json.loads((RESULTS / "attacks_digits16.json").read_text())["results"]
    runs = {name: elijah_row(name, model, group in ("backdoored", "robustness")) for group, models in GROUPS
            for name, model in models.items()}
    threshold = fit_spread_threshold([runs[n]["spread"] for n in CALIBRATION])
    terd_thr = Thresholds.load(RESULTS / "thresholds_fast_digits16.json")  # bench_detection.py's, not scan-time ones
    rows, tally = [], {"elijah": [0, 0, 0, 0], "terd-fast": [0, 0, 0, 0]}  # TP, P, TN, N (main table only)
    for group, models in GROUPS:
        for name in models:
            e = runs[name]
            terd = json.loads((CACHE / name / "report.json").read_text())
            row = {"model": name, "group": group, "elijah_spread": round(e["spread"], 4),
                   "elijah_clean_spread": round(e["clean_spread"], 4), "elijah_evals": e["evals"],
                   "elijah_seconds": round(e["seconds"]), "elijah_trigger_l2": round(e["trigger_l2"], 2)
                   if "trigger_l2" in e else None}
            if group == "calibration benign":
                row["elijah_verdict"] = row["terd_verdict"] = "(fits thresholds)"
                rows.append(row)
                continue
            row["elijah_verdict"] = "backdoored" if e["spread"] < threshold else "benign"
            row["terd_verdict"] = detect_model(terd["scores"], terd_thr).verdict
            counted = True
            if group in ("backdoored", "robustness"):
                a = max((asr.get(k, {}) for k in (name, f"{name}@ddpm")), key=lambda x: x.get("asr_triggered") or 0)
                row["attack_asr"] = a.get("asr_triggered")
                counted = row["counted"] = (a.get("asr_triggered") or 0) >= 0.9
            if counted and group != "robustness":
                for key, verdict in (("elijah", row["elijah_verdict"]), ("terd-fast", row["terd_verdict"])):
                    pos = group == "backdoored"
                    tally[key][0 if pos else 2] += verdict == ("backdoored" if pos else "benign")
                    tally[key][1 if pos else 3] += 1
            rows.append(row)
            print(row, flush=True)
    summary = "; ".join(f"{k}: TPR {t[0]}/{t[1]}, TNR {t[2]}/{t[3]}" for k, t in tally.items())
    summary += " (robustness rows not tallied)"
    note = (f"Elijah threshold (fitted on {', '.join(CALIBRATION)}): spread < {threshold:.4f} flags a model. "
            f"terd-fast verdicts: bench_detection.py's scans and thresholds. Counted models only: {summary}. "
            "Spread = mean per-pixel std over 16 DDPM generations from eps + tau*, pixels clamped to [-1, 1] (low = "
            "uniform = backdoor-like).")
    cols = ["model", "group", "attack_asr", "counted", "elijah_spread", "elijah_clean_spread", "elijah_verdict",
            "terd_verdict", "elijah_trigger_l2", "elijah_evals", "elijah_seconds"]
    write_results("elijah_vs_terd_digits16", rows, cols, notes=note)
    print(summary)


if __name__ == "__main__":
    main()
