"""Refit terd's shipped ``fast`` thresholds on benign tiny-digits16 models, and judge every other model by them.

History: the first shipped fit (benchmarks/bench_detection.py) used three benign models; the second, six benign
models of the headline bench (benchmarks/results/bench_digits16/: seeds 0, 1, 2, 3, 5 and a clean fine-tune of
seed 0, minus the seed-4 model whose weights are the demo's benign model: the demo must be judged by thresholds it
did not help make). Judged on benign bases outside it (bench_digits16_lengths, `terd bench --thresholds shipped`)
that six-model fit flagged a 20-epoch base, so this script now fits on twelve: those six, the three length bases
(10, 20, 40 epochs) and three of the six bases of bench_digits16_benign_more (seeds 23, 25, 27; the split was fixed
in its zoo file before any was scanned). Seeds 24, 26, 28 and the demo's benign model stay outside the fit and are
judged by it, with every backdoor of the headline bench. The six-model fit's verdicts are shown beside.

L_p (the patch probe's localization) exists only for models whose probe support was recorded or can be recomputed:
the six of the twelve still on disk (the headline bench's are not), so it is fitted on those six
(model_detection.refit_feature; its stats name them), from bench rows or localization.json (bench_localization.py;
the demo's models by their own weights). The six-model column shows that fit as shipped (KL features only).

No model is scanned: every feature comes from committed bench results. The scans behind them ran before and after
the `fast` descent start (reversion._fixed_gamma_descent); on every digits16 model checked the line point won
(benchmarks/results/descent_start.md), which leaves a scan bit-identical, so the features are comparable.

Run: .venv/bin/python benchmarks/fit_fast_defaults.py → fast_defaults.md / .json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fast_features, recomputed_localization, with_window_fit, write_results  # noqa: E402

from terd.defense.calibration import install_defaults  # noqa: E402
from terd.defense.model_detection import detect_model, fit_thresholds, refit_feature  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = RESULTS / "bench_digits16" / "results.json"
MORE_BENCHES = ("bench_digits16_lengths", "bench_digits16_benign_more")  # benign bases judged held out, then fitted
HELD_OUT = {"d16-benign-s24-e16", "d16-benign-s26-e30", "d16-benign-s28-e36"}  # fixed before they were scanned
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


def _fit(rows: list[dict], what: str) -> object:
    return fit_thresholds([r["defenses"]["terd-fast"] for r in rows], provenance={
        "preset": "fast", "seed": 0, "models": [r["id"] for r in rows],
        "source": f"benchmarks/fit_fast_defaults.py: terd-fast rows of {what} "
                  "(benign tiny-digits16 models; the demo's benign model and three held-out bases left out)"})


def main() -> None:
    bench = json.loads(BENCH.read_text())
    twins = check_demo_twins(ROOT / bench["meta"]["cache"])
    if not all(twins.values()):
        raise SystemExit(f"demo models differ from their bench twins: {twins}")
    lp = recomputed_localization()
    lp |= {row: lp[demo] for demo, row in DEMO.items() if demo in lp}  # the demo's models: their twins' weights
    rows = [r for r in bench["models"] if r["dataset"] == "digits16" and "terd-fast" in r["defenses"]]
    six = [r for r in rows if not r["backdoored"] and r["id"] not in DEMO.values()]
    for name in MORE_BENCHES:
        rows += [r for r in json.loads((RESULTS / name / "results.json").read_text())["models"]
                 if "terd-fast" in r["defenses"]]
    rows = [{**r, "feats": fast_features(r, lp)} for r in rows]
    calib = [r for r in rows if not r["backdoored"] and r["id"] not in DEMO.values() and r["id"] not in HELD_OUT]
    calib_ids = {r["id"] for r in calib}
    before = _fit(six, "benchmarks/results/bench_digits16")
    thr = _fit(calib, "benchmarks/results/" + ", ".join(("bench_digits16", *MORE_BENCHES)))
    with_lp = [r for r in calib if "L_p" in r["feats"]]
    thr = refit_feature(thr, "L_p", [r["feats"]["L_p"] for r in with_lp], [r["id"] for r in with_lp])
    thr = with_window_fit(thr, "tiny-digits16")
    install_defaults(thr, "fast", family="tiny-digits16")
    demo_of = {row: demo for demo, row in DEMO.items()}
    six_ids = {r["id"] for r in six}
    out = []
    for r in rows:
        feats = r["feats"]
        verdict, old = detect_model(feats, thr), detect_model(feats, before)
        out.append({"model": r["id"], "demo_model": demo_of.get(r["id"], ""), "truth": "backdoored" if r["backdoored"] else "benign",
                    "asr": r.get("asr"), "counted": (not r["backdoored"]) or (r.get("asr") or 0) >= 0.9,
                    "tags": ",".join(r.get("tags", [])),
                    **{f: round(feats[f], 5) if f in feats else None for f in ("M_r", "V_r", "P_r", "L_p", "W_p")},
                    "six_model_fit": "(in fit)" if r["id"] in six_ids else old.verdict,
                    "verdict": "(fits thresholds)" if r["id"] in calib_ids else verdict.verdict,
                    "flagged_by": "" if r["id"] in calib_ids else ",".join(verdict.flagged_by)})
        print(out[-1], flush=True)
    judged = [o for o in out if o["verdict"] != "(fits thresholds)" and o["counted"]]
    right = sum(o["verdict"] == o["truth"] for o in judged)
    benign = [o for o in judged if o["truth"] == "benign"]
    cols = ["model", "demo_model", "truth", "asr", "counted", "tags", "M_r", "V_r", "P_r", "L_p", "W_p", "six_model_fit", "verdict",
            "flagged_by"]
    write_results("fast_defaults", out, cols, notes=(
        f"Shipped `fast` thresholds refitted (mean + 3 std over {len(calib)} benign models: "
        f"{', '.join(r['id'] for r in calib)}): M_r > {thr.M_r:.4f} or V_r > {thr.V_r:.5f} or P_r > {thr.P_r:.4f}, "
        f"or L_p > {thr.L_p:.3f} (mean + 3 std over the {len(with_lp)} of them whose probe support exists: "
        f"{', '.join(r['id'] for r in with_lp)}), or W_p > {thr.W_p:.4f} (mean + 3 std over the same six, probed "
        "by bench_window_search.py: window_search.md; these rows were scanned before W_p existed, so W_p is unscored "
        "here and the verdicts are those of the other features) "
        f"(the six-model fit: {before.M_r:.4f} / {before.V_r:.5f} / {before.P_r:.4f}). Every other model judged by "
        f"them: {right}/{len(judged)} right among those counted (benign, or an attack that fires: ASR >= 0.9), "
        f"{sum(o['verdict'] == 'benign' for o in benign)}/{len(benign)} benign models outside the fit kept. "
        "Features: the benches' terd-fast scans (no model rescanned). The demo's models have the weights of the "
        "rows marked demo_model (" + (f"sha256 checked: {twins}" if twins else "not re-checked here: the headline "
                                      "bench's cache is not on disk") + ")."))


if __name__ == "__main__":
    main()
