"""The patch probe (terd.defense.patch_probe) on TrojDiff patch models and on models without a patch.

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
The 32 px rows (tiny-photos32-dc, 3 x 3 patch in every channel): the window rule of localized residual components
was developed on p32dc-troj-d2i-patch (bench_photos32dc_mini's model, where the first probe's spread cut marked the
corners: patch_window_dc.md) and runs/patch24; p32dc-patch-s1 is held out (another base and seed):
  terd attack trojdiff --base runs/zoo-cache/p32dc-benign-s1 --out runs/quick32/p32dc-patch-s1 --setting d2i \
      --trigger patch --epochs 3 --batch-size 16 --preview 0 --seed 1
Models of the dc bench reuse that bench's recorded reversion candidates (its triggers/ folder; the earlier probe's
candidate dropped) and attack-success measurements (runs/zoo-cache/attack-success), so only the probe runs again.
Run: .venv/bin/python benchmarks/bench_patch_probe.py [--only MODEL ...]  (--only: those models again; the
recorded rows of the others are kept)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, measured_success, write_results  # noqa: E402

from terd.attacks import load_true_trigger  # noqa: E402
from terd.bench import INPUT_FPR, input_detection_report, input_tpr_bound  # noqa: E402
from terd.defense.model_detection import kl_features  # noqa: E402
from terd.defense.patch_probe import probe_patch  # noqa: E402
from terd.defense.reversion import CountingDenoiser, get_config, reverse_trigger  # noqa: E402
from terd.defense.trigger import load_candidates  # noqa: E402
from terd.models import load_denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src/terd/assets/models"
DC_CACHE = ROOT / "runs/zoo-cache"  # bench_photos32dc_mini's models
DC_BENCH = ROOT / "benchmarks/results/bench_photos32dc_mini"
PATCH_MODELS = [("runs/patch24", "development"), ("runs/patch24-s1", "held out"),
                ("runs/zoo-digits16/d16-troj-d2i-patch-e24", "held out"),
                ("runs/zoo-cache/p32dc-troj-d2i-patch", "development"), ("runs/quick32/p32dc-patch-s1", "held out")]
OTHER_MODELS = [ASSETS / "digits-benign", ASSETS / "demo-benign", ASSETS / "demo-trojdiff",
                *sorted((ROOT / "runs/zoo-digits16").glob("d16-benign-*")),
                *sorted((ROOT / "runs/zoo-digits16-ve").glob("ve-*")),
                *sorted(p for p in DC_CACHE.glob("p32dc-*") if "patch" not in p.name)]
N_INPUTS = 10_000


def recorded_candidates(path: Path) -> tuple[list, int] | None:
    """The dc bench's reversion candidates of this model and the reported one's index (largest M_r), else None."""
    file = DC_BENCH / "triggers" / f"{path.name}--terd-fast.candidates.safetensors"
    row_file = DC_BENCH / "rows" / f"{path.name}.json"
    if path.parent != DC_CACHE or not file.is_file() or not row_file.is_file():
        return None
    probe_index = json.loads(row_file.read_text())["row"]["defenses"]["terd-fast"]["patch_probe"]["candidate_index"]
    cands = load_candidates(file)[:probe_index]
    return cands, max(range(len(cands)), key=lambda i: kl_features(cands[i])["M_r"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="MODEL", help="run these models (directory names) only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    models = [(ROOT / p, role) for p, role in PATCH_MODELS] + [(p, "no patch") for p in OTHER_MODELS]
    earlier = {}
    if args.only:
        unknown = set(args.only) - {p.name for p, _ in models}
        if unknown:
            print(f"error: not a model of this benchmark: {', '.join(sorted(unknown))}", file=sys.stderr)
            sys.exit(2)
        try:
            earlier = {r["model"]: r for r in json.loads((RESULTS / "patch_probe.json").read_text())["rows"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: --only needs a readable earlier {RESULTS / 'patch_probe.json'} ({exc})", file=sys.stderr)
            sys.exit(2)
    for path, role in models:
        if args.only and path.name not in args.only:
            if path.name in earlier:
                rows.append(earlier[path.name])
            continue
        if not (path / "model_index.json").is_file():
            print(f"skip {path} (not built)", flush=True)
            continue
        den = load_denoiser(path)
        backdoored = (path / "true_trigger.safetensors").is_file()
        row = {"model": path.name, "role": role, "backdoored": backdoored}
        if backdoored:
            asr = measured_success(path)
            row |= {"asr": asr["asr"], "clean_asr": asr["clean_asr"], "asr_sampler": asr["asr_sampler"]}
        t0 = time.perf_counter()
        counted = CountingDenoiser(den)
        probe = probe_patch(counted)
        s = probe.summary()
        row |= {"window": s["window_elements"], "leading_support": s["leading_support"],
                "localized_components": s["localized_components"], "value": s["value"],
                "explained_offset": s["explained_offset"], "probe_seconds": round(time.perf_counter() - t0, 1)}
        if backdoored:
            r_true, g_true = load_true_trigger(path)
            support = (g_true != 1) | (r_true != 0)
            row["window_is_true_support"] = bool(torch.equal(probe.window, support))
            row["true_value"] = round(float(r_true[support].mean()), 4) if support.sum() < support.numel() else None
        if role != "no patch":
            recorded = recorded_candidates(path)
            if recorded is None:
                res = reverse_trigger(den, replace(get_config("fast"), patch_probe=False), seed=0)  # probed above
                cands, reported = res.candidate_triggers, next(i for i, c in enumerate(res.candidates) if c["reported"])
                evaluations = res.network_evaluations + counted.evaluations
            else:
                cands, reported = recorded
                evaluations = None
            row["reversion"] = "fresh" if recorded is None else "recorded"
            plus = cands + ([probe.candidate] if probe.candidate is not None else [])
            without = input_detection_report(cands, reported, r_true, g_true, N_INPUTS, 99, INPUT_FPR)
            with_ = input_detection_report(plus, reported, r_true, g_true, N_INPUTS, 99, INPUT_FPR)
            row |= {"tpr_without_probe": without["tpr"], "tnr_without_probe": without["tnr"],
                    "tpr_with_probe": with_["tpr"], "tnr_with_probe": with_["tnr"],
                    "kept_candidates": with_["kept_candidates"], "ceiling": input_tpr_bound(path, INPUT_FPR),
                    "evaluations": evaluations}
        row["probe_evaluations"] = counted.evaluations
        rows.append(row)
        print(row, flush=True)
    cols = ["model", "role", "backdoored", "asr", "clean_asr", "window", "leading_support", "localized_components",
            "window_is_true_support", "value", "true_value", "explained_offset", "reversion", "tpr_without_probe",
            "tpr_with_probe", "ceiling", "tnr_without_probe", "tnr_with_probe", "kept_candidates", "evaluations",
            "probe_evaluations", "probe_seconds"]
    write_results("patch_probe", rows, cols, notes=(
        "window: the support of the leading localized components of the residual eps_theta(x, T-1) - x over "
        "benign noise, each element's linear response to its own input removed; leading_support: the leading "
        "component's effective support in elements (a window needs it at most 5% of the image); value: the probe's "
        "patch value (true_value: the trigger's). tpr/tnr: the fast "
        f"scan's any-candidate input detector at FPR budget {INPUT_FPR:g} (split evenly over the kept candidates) "
        f"on {N_INPUTS:,} true backdoor and {N_INPUTS:,} benign noises, without and with the probe's candidate; "
        "ceiling: the best TPR any detector of x_T reaches at that FPR (the true trigger's own test). asr: the "
        "bench's attack success (64 samples, the best of the attack's samplers). reversion: fresh (this run's fast "
        "scan) or recorded (bench_photos32dc_mini's candidates, its probe's dropped; evaluations then blank). "
        "Development models: runs/patch24 and p32dc-troj-d2i-patch; the others are held out."))


if __name__ == "__main__":
    main()
