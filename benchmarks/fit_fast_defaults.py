"""Refit terd's shipped ``fast`` thresholds on the benign tiny-digits16 models of the headline bench.

The first shipped fit (benchmarks/bench_detection.py) used three benign models, and a std from three values
is rough. The headline bench (benchmarks/results/bench_digits16/) has scanned seven benign digits16 models with
the same ``fast`` schedule and seed (its seeds 1-3 rows carry exactly the features of that first fit). This
script fits mean + 3 std on them, minus the one whose weights are the demo's benign model (d16-benign-s4-e35
= src/terd/assets/models/demo-benign): the demo must be judged by thresholds it did not help make.

It then judges, with the new thresholds, every bench model that is not in the fit (the demo's two models,
whose weights equal bench rows, are among them) and installs the fit as the shipped ``fast`` default.
No model is scanned: every feature comes from the committed bench results.

Run: .venv/bin/python benchmarks/fit_fast_defaults.py → fast_defaults.md / .json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from terd.defense.calibration import install_defaults  # noqa: E402
from terd.defense.model_detection import detect_model, fit_thresholds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = RESULTS / "bench_digits16" / "results.json"
ASSETS = ROOT / "src/terd/assets/models"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
DEMO = {"demo-benign": "d16-benign-s4-e35", "demo-trojdiff": "d16-troj-d2i-blend-e12"}  # same weights


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_demo_twins(cache: Path) -> dict[str, bool]:
    """Whether each demo model's weights equal its bench twin's (checked when the bench cache is here)."""
    out = {}
    for demo, row in DEMO.items():
        if (cache / row / WEIGHTS).is_file():
            out[demo] = _digest(ASSETS / demo / WEIGHTS) == _digest(cache / row / WEIGHTS)
    return out


def main() -> None:
    bench = json.loads(BENCH.read_text())
    twins = check_demo_twins(ROOT / bench["meta"]["cache"])
    if not all(twins.values()):
        raise SystemExit(f"demo models differ from their bench twins: {twins}")
    rows = [r for r in bench["models"] if r["dataset"] == "digits16" and "terd-fast" in r["defenses"]]
    calib = [r for r in rows if not r["backdoored"] and r["id"] not in DEMO.values()]
    calib_ids = {r["id"] for r in calib}
    thr = fit_thresholds([r["defenses"]["terd-fast"] for r in calib], provenance={
        "preset": "fast", "seed": 0, "models": [r["id"] for r in calib],
        "source": "benchmarks/fit_fast_defaults.py: terd-fast rows of benchmarks/results/bench_digits16 "
                  "(benign tiny-digits16 models; the demo's benign model left out)"})
    install_defaults(thr, "fast", family="tiny-digits16")
    demo_of = {row: demo for demo, row in DEMO.items()}
    out = []
    for r in rows:
        feats = r["defenses"]["terd-fast"]
        verdict = detect_model(feats, thr)
        out.append({"model": r["id"], "demo_model": demo_of.get(r["id"], ""), "truth": "backdoored" if r["backdoored"] else "benign",
                    "asr": r.get("asr"), "counted": (not r["backdoored"]) or (r.get("asr") or 0) >= 0.9,
                    "tags": ",".join(r.get("tags", [])),
                    **{f: round(feats[f], 5) for f in ("M_r", "V_r", "P_r")},
                    "verdict": "(fits thresholds)" if r["id"] in calib_ids else verdict.verdict,
                    "flagged_by": "" if r["id"] in calib_ids else ",".join(verdict.flagged_by)})
        print(out[-1], flush=True)
    judged = [o for o in out if o["verdict"] != "(fits thresholds)" and o["counted"]]
    right = sum(o["verdict"] == o["truth"] for o in judged)
    cols = ["model", "demo_model", "truth", "asr", "counted", "tags", "M_r", "V_r", "P_r", "verdict", "flagged_by"]
    write_results("fast_defaults", out, cols, notes=(
        f"Shipped `fast` thresholds refitted (mean + 3 std over {len(calib)} benign models: "
        f"{', '.join(r['id'] for r in calib)}): M_r > {thr.M_r:.4f} or V_r > {thr.V_r:.5f} or P_r > {thr.P_r:.4f}. "
        f"Every other bench model judged by them: {right}/{len(judged)} right among those counted (benign, or an attack "
        "that fires: ASR >= 0.9). Features: the bench's terd-fast scans (no model rescanned). The demo's models have the "
        f"weights of the rows marked demo_model (sha256 checked: {twins})."))


if __name__ == "__main__":
    main()
