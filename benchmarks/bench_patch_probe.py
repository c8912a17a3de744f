"""The patch probe (terd.defense.patch_probe) on the TrojDiff 2x2 patch models and on models without a patch.

Input detection missed the 2x2 patch's inputs (TPR 0.0001 in the digits16 bench): no reversion candidate lands on
the patch. The probe adds one candidate when the model's residual spread marks a small window. Here, per model:
its attack success (the bench's rule: every sampler the attack offers, the best counts), the probe's window and
value, and -- on the patch models -- the fast scan's any-candidate input detector at the bench's FPR budget on
10,000 benign and 10,000 true backdoor noises, without and with the probe's candidate, next to the ceiling (the
true trigger's own likelihood-ratio test, Neyman-Pearson). On the other models: whether a window appears at all
(no window = their detectors are unchanged).

runs/patch24 is the model the probe was developed on (its grid, gamma and parabola were chosen looking at it);
the other two patch models are held out: a second seed, and the digits16 zoo's recipe (d16-troj-d2i-patch-e24:
base d16-benign-s0-e40, seed 0), rebuilt here. Recipes:
  terd attack trojdiff --base src/terd/assets/models/digits-benign --out runs/patch24 --setting d2i --trigger patch --epochs 24 --seed 0
  ... --out runs/patch24-s1 ... --seed 1
  terd attack trojdiff --base runs/zoo-digits16/d16-benign-s0-e40 --out runs/zoo-digits16/d16-troj-d2i-patch-e24 --setting d2i --trigger patch --epochs 24 --seed 0
Run: .venv/bin/python benchmarks/bench_patch_probe.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.attacks import load_true_trigger  # noqa: E402
from terd.bench import INPUT_FPR, attack_success, input_detection_report, input_tpr_bound  # noqa: E402
from terd.defense.patch_probe import probe_patch  # noqa: E402
from terd.defense.reversion import reverse_trigger  # noqa: E402
from terd.models import load_denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src/terd/assets/models"
PATCH_MODELS = [("runs/patch24", "development"), ("runs/patch24-s1", "held out"),
                ("runs/zoo-digits16/d16-troj-d2i-patch-e24", "held out")]
OTHER_MODELS = [ASSETS / "digits-benign", ASSETS / "demo-benign", ASSETS / "demo-trojdiff",
                *sorted((ROOT / "runs/zoo-digits16").glob("d16-benign-*")),
                *sorted((ROOT / "runs/zoo-digits16-ve").glob("ve-*"))]
N_INPUTS = 10_000


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    models = [(ROOT / p, role) for p, role in PATCH_MODELS] + [(p, "no patch") for p in OTHER_MODELS]
    for path, role in models:
        if not (path / "model_index.json").is_file():
            print(f"skip {path} (not built)", flush=True)
            continue
        den = load_denoiser(path)
        backdoored = (path / "true_trigger.safetensors").is_file()
        row = {"model": path.name, "role": role, "backdoored": backdoored}
        if backdoored:
            asr = attack_success(path)
            row |= {"asr": asr["asr"], "clean_asr": asr["clean_asr"], "asr_sampler": asr["asr_sampler"]}
        t0 = time.perf_counter()
        probe = probe_patch(den)
        s = probe.summary()
        row |= {"window": s["window_elements"], "ratio_max": s["ratio_max"], "value": s["value"],
                "explained_offset": s["explained_offset"], "probe_seconds": round(time.perf_counter() - t0, 1)}
        if backdoored:
            r_true, g_true = load_true_trigger(path)
            support = (g_true != 1) | (r_true != 0)
            row["window_is_true_support"] = bool(torch.equal(probe.window, support))
            row["true_value"] = round(float(r_true[support].mean()), 4) if support.sum() < support.numel() else None
        if role != "no patch":
            res = reverse_trigger(den, "fast", seed=0)
            reported = next(i for i, c in enumerate(res.candidates) if c["reported"])
            without = input_detection_report(res.candidate_triggers, reported, r_true, g_true, N_INPUTS, 99, INPUT_FPR)
            with_ = input_detection_report(res.input_candidates, reported, r_true, g_true, N_INPUTS, 99, INPUT_FPR)
            row |= {"tpr_without_probe": without["tpr"], "tnr_without_probe": without["tnr"],
                    "tpr_with_probe": with_["tpr"], "tnr_with_probe": with_["tnr"],
                    "kept_candidates": with_["kept_candidates"], "ceiling": input_tpr_bound(path, INPUT_FPR),
                    "evaluations": res.network_evaluations + res.probe_evaluations,
                    "probe_evaluations": res.probe_evaluations}
        rows.append(row)
        print(row, flush=True)
    cols = ["model", "role", "backdoored", "asr", "clean_asr", "window", "ratio_max", "window_is_true_support",
            "value", "true_value", "explained_offset", "tpr_without_probe", "tpr_with_probe", "ceiling",
            "tnr_without_probe", "tnr_with_probe", "kept_candidates", "evaluations", "probe_evaluations",
            "probe_seconds"]
    write_results("patch_probe", rows, cols, notes=(
        f"window: elements whose residual spread eps_theta(x, T-1) - x over benign noise exceeds the probe's cut "
        "(4x the median element's); value: the probe's patch value (true_value: the trigger's). tpr/tnr: the fast "
        f"scan's any-candidate input detector at FPR budget {INPUT_FPR:g} (split evenly over the kept candidates) "
        f"on {N_INPUTS:,} true backdoor and {N_INPUTS:,} benign noises, without and with the probe's candidate; "
        "ceiling: the best TPR any detector of x_T reaches at that FPR (the true trigger's own test). asr: the "
        "bench's attack success (64 samples, the best of the attack's samplers). runs/patch24 is the development "
        "model; the others are held out."))


if __name__ == "__main__":
    main()
