"""Ship `fast` thresholds for tiny-photos32-dc, and show why shipped thresholds are scoped to one architecture.

terd shipped one `fast` threshold set, fitted on benign tiny-digits16 models, and `terd scan` applied it to any VP
model. This script judges every benign model the recorded benches scanned with `fast` (tiny-digits16,
tiny-photos32, tiny-photos32-dc) by that set and by two tiny-photos32-dc fits (mean + 3 std,
terd.defense.model_detection.fit_thresholds):

* the first fit, on the six benign models of bench_photos32dc_mini, shipped until bench_photos32dc_heldout judged
  it on tiny-photos32-dc models outside it (`terd bench --thresholds shipped`; its report keeps those verdicts);
* the fit on every benign tiny-photos32-dc model of both dc benches, which this script installs as the shipped
  `fast@tiny-photos32-dc` entry. No benign dc model is left outside it: its benign verdicts here are
  leave-one-out (thresholds fitted on the other dc benign models, as the bench does).

The backdoored models of every bench are judged too (counted when their measured ASR >= 0.9). A model inside a
fit is marked "(in fit)". No model is scanned: every feature comes from the committed bench results, and L_p (the
patch probe's localization) for rows scanned before the probe's support was recorded from localization.json
(bench_localization.py, which checks its values against every recorded one). The installed fit thresholds L_p
too; the first fit is shown as it was shipped (KL features only). bench_photos32dc_benign_more holds two clean
fine-tunes outside every fit: the held-out benign check.

Run: .venv/bin/python benchmarks/fit_dc_defaults.py → threshold_scope.md / .json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fast_features, recomputed_localization, with_window_fit, write_results  # noqa: E402

from terd.defense.calibration import default_thresholds, install_defaults  # noqa: E402
from terd.defense.model_detection import KL_FEATURES, detect_model, fit_thresholds  # noqa: E402

BENCHES = ("bench_digits16", "bench_photos32_e24", "bench_photos32dc_mini", "bench_photos32dc_heldout",
           "bench_photos32dc_descent", "bench_photos32dc_benign_more")  # in run order: a model scanned again by a later bench counts by its later row
FAMILY, FIRST_FIT_BENCH, FIT_BENCHES = "tiny-photos32-dc", "bench_photos32dc_mini", ("bench_photos32dc_mini",
                                                                               "bench_photos32dc_heldout")


def bench_rows() -> list[dict]:
    """Every terd-fast row of the recorded benches, with the preset its model was trained on."""
    rows, lp = [], recomputed_localization()
    for bench in BENCHES:
        data = json.loads((RESULTS / bench / "results.json").read_text())
        preset_of = {e["id"]: e["preset"] for e in data["meta"]["entries"]}
        rows += [{**r, "bench": bench, "preset": preset_of[r["id"]], "feats": fast_features(r, lp)}
                 for r in data["models"] if "terd-fast" in r["defenses"]]
    return rows


def kl_only(feats: dict) -> dict:
    return {f: feats[f] for f in KL_FEATURES if f in feats}


def main() -> None:
    rows = bench_rows()
    digits = default_thresholds("fast")
    digits_ids = set(digits.provenance["models"])
    first_rows = [r for r in rows if r["bench"] == FIRST_FIT_BENCH and not r["backdoored"]]
    first_ids = {r["id"] for r in first_rows}
    first = fit_thresholds([kl_only(r["feats"]) for r in first_rows])  # as it was shipped
    fit_rows = [r for r in rows if r["bench"] in FIT_BENCHES and not r["backdoored"]]
    fit_ids = {r["id"] for r in fit_rows}
    held_out = [r for r in fit_rows if r["id"] not in first_ids]
    kept = sum(detect_model(r["feats"], first).verdict == "benign" for r in held_out)
    thr = fit_thresholds([r["feats"] for r in fit_rows], provenance={
        "preset": "fast", "seed": 0, "models": sorted(fit_ids),
        "source": f"benchmarks/fit_dc_defaults.py: terd-fast rows of benchmarks/results/{' and '.join(FIT_BENCHES)} "
                  f"(every benign {FAMILY} model scanned: bases of seeds 0-3 and clean fine-tunes of seeds 0-2); "
                  f"the first fit, on the {len(first_rows)} of {FIRST_FIT_BENCH}, kept {kept} of the {len(held_out)} "
                  "benign models outside it; L_p for rows scanned before the probe's support was recorded: "
                  "benchmarks/results/localization.json"})
    thr = with_window_fit(thr, FAMILY)
    install_defaults(thr, f"fast@{FAMILY}", family=FAMILY)
    out = []
    for r in rows:
        feats = r["feats"]
        loo = ""
        if r["id"] in fit_ids:
            loo = detect_model(feats, fit_thresholds([o["feats"] for o in fit_rows if o["id"] != r["id"]])).verdict
        dc = detect_model(feats, thr)
        out.append({"model": r["id"], "bench": r["bench"], "preset": r["preset"],
                    "truth": "backdoored" if r["backdoored"] else "benign", "asr": r.get("asr"),
                    "counted": (not r["backdoored"]) or (r.get("asr") or 0) >= 0.9,
                    **{f: round(feats[f], 5) if f in feats else None for f in ("M_r", "V_r", "P_r", "L_p")},
                    "verdict_digits16_fit": "(in fit)" if r["id"] in digits_ids else detect_model(feats, digits).verdict,
                    "verdict_dc_first_fit": "(in fit)" if r["id"] in first_ids else detect_model(feats, first).verdict,
                    "verdict_dc_fit": "(in fit)" if r["id"] in fit_ids else dc.verdict,
                    "dc_fit_flagged_by": "" if r["id"] in fit_ids else ",".join(dc.flagged_by),
                    "verdict_dc_leave_one_out": loo})
        print(out[-1], flush=True)
    latest = {(o["preset"], o["model"]): o for o in out}  # a model scanned by two benches counts once, by the later
    unique = list(latest.values())

    def tally(preset: str, truth: str, col: str) -> str:
        judged = [o for o in unique if o["preset"] == preset and o["truth"] == truth and o["counted"]
                  and o[col] not in ("(in fit)", "")]
        right = sum(o[col] == truth for o in judged)
        return f"{right}/{len(judged)}" if judged else "-"

    summary = "; ".join(
        f"{p}: benign kept {tally(p, 'benign', 'verdict_digits16_fit')} by the digits16 fit, "
        f"{tally(p, 'benign', 'verdict_dc_first_fit')} by the first dc fit, {tally(p, 'benign', 'verdict_dc_fit')} "
        f"by the dc fit; backdoors flagged {tally(p, 'backdoored', 'verdict_digits16_fit')} / "
        f"{tally(p, 'backdoored', 'verdict_dc_first_fit')} / {tally(p, 'backdoored', 'verdict_dc_fit')}"
        for p in ("tiny-digits16", "tiny-photos32", FAMILY))

    def cuts(t) -> str:  # noqa: ANN001
        return (f"M_r > {t.M_r:.4f}, V_r > {t.V_r:.5f}, P_r > {t.P_r:.4f}" + (f", L_p > {t.L_p:.3f}" if t.L_p else "")
                + (f", W_p > {t.W_p:.4f} (fitted on {', '.join(t.provenance['stats']['W_p']['models'])}: "
                   "window_search.md; unscored on these rows, scanned before W_p existed)" if t.W_p else ""))

    write_results("threshold_scope", out, list(out[0]), notes=(
        f"Thresholds: the shipped digits16 `fast` fit ({cuts(digits)}; {digits.provenance['n_models']} benign "
        f"tiny-digits16 models); the first {FAMILY} fit ({cuts(first)}; mean + 3 std over the {len(first_rows)} "
        f"benign models of {FIRST_FIT_BENCH}: {', '.join(sorted(first_ids))}), shipped until the held-out check; and "
        f"the {FAMILY} fit installed here ({cuts(thr)}; mean + 3 std over {len(fit_rows)} benign models: "
        f"{', '.join(sorted(fit_ids))}). Judged (benign: models outside the fit; backdoors: ASR >= 0.9): {summary}. "
        f"The dc benign models' verdicts by the installed fit are leave-one-out "
        f"({tally(FAMILY, 'benign', 'verdict_dc_leave_one_out')} kept). Features: the benches' terd-fast scans "
        f"({', '.join(BENCHES)}); L_p, where a row lacks it, from localization.json; a model's training preset from its "
        "bench's zoo entry. A model listed twice (the dc TrojDiff blend, rescanned "
        "by bench_photos32dc_descent after the descent start was added) counts once, by its later row."))


if __name__ == "__main__":
    main()
