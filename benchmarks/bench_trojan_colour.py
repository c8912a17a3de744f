"""Why TrojDiff D2I stalls at ASR ~0.8 on tiny-photos32: do its misses get the target's shape but the wrong colour?

The eval grids of the quick 32 px TrojDiff models (quick_finetune_photos32.md) show the target's shape in
every triggered sample, tinted with the colour of the clean sample drawn from the same noise. If so, the
misses are the DC blindness dc_gain.md measured for BadDiffusion: the tiny photos32 networks do not read
their input's per-channel mean, so an image's colour is set by the initial noise and no fine-tune that only
changes the noise prediction's shape can move it to the target's. Any attack with an image target can be
measured (a VillanDiffusion model is the contrast: its backdoor fires at 32 px). Per model, with the attack's own sampler
and n shared unit noises (as ``terd eval-attack``):

* ``colour_corr``: correlation, over images and channels, of each triggered sample's per-channel mean with
  that of the clean sample from the same noise (1 = the trigger leaves the colour to the noise);
* ``mse`` / ``mse_dc`` / ``mse_shape``: per-image MSE to the target ([0, 1] pixels) and its split into the
  per-channel mean part and the rest (they add up);
* ``asr`` and ``asr_dc_corrected``: the ASR at the eval threshold as sampled, and with each triggered
  sample's per-channel mean replaced by the target's (what the backdoor would score if colour were right).

Run: .venv/bin/python benchmarks/bench_trojan_colour.py MODEL_DIR [MODEL_DIR ...]
(models written by ``terd attack`` with an image target: not TrojDiff D2D; writes benchmarks/results/trojan_colour.{json,md})
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.attacks import load_attack  # noqa: E402
from terd.attacks.evaluation import choose_threshold, reference_dataset, sample_pairs, to_unit  # noqa: E402
from terd.errors import TerdError  # noqa: E402
from terd.models import load_denoiser  # noqa: E402


def colour_row(model_dir: Path, n: int, seed: int) -> dict:
    den = load_denoiser(model_dir)
    attack = load_attack(model_dir)
    if attack.target_is_class:
        raise TerdError(f"{model_dir}: a class target (D2D) has no one target colour; pass image-target models")
    clean, trig = (to_unit(x) for x in sample_pairs(den, attack, n, seed=seed))
    target = to_unit(attack.target_images()[:1])
    ref = reference_dataset(model_dir, den)
    thr, _ = choose_threshold(attack.target_images()[0], ref.images if ref is not None else None)
    mean_t, mean_c, mean_target = (x.mean(dim=(2, 3), keepdim=True) for x in (trig, clean, target))
    mse = (trig - target).square().mean(dim=(1, 2, 3))
    mse_dc = (mean_t - mean_target).square().mean(dim=(1, 2, 3))  # the mean part of each channel's error
    corrected = (trig - mean_t + mean_target - target).square().mean(dim=(1, 2, 3))
    corr = torch.corrcoef(torch.stack([mean_t.flatten(), mean_c.flatten()]))[0, 1]
    return {"model": str(model_dir), "attack": attack.describe(), "sampler": attack.sampler, "n": n,
            "threshold": thr, "colour_corr": round(float(corr), 3), "mse": round(float(mse.mean()), 4),
            "mse_dc": round(float(mse_dc.mean()), 4), "mse_shape": round(float(corrected.mean()), 4),
            "asr": round(float((mse < thr).float().mean()), 3),
            "asr_dc_corrected": round(float((corrected < thr).float().mean()), 3),
            "misses": int((mse >= thr).sum()),
            "misses_fixed_by_colour": int(((mse >= thr) & (corrected < thr)).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    try:
        for m in args.models:
            if not (m / "attack.json").is_file():
                raise TerdError(f"{m}: not a model written by terd attack (no attack.json)")
        for m in args.models:
            rows.append(colour_row(m, args.n, args.seed))
            print(rows[-1], flush=True)
    except TerdError as e:  # a wrong path, a broken model, a class target: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    columns = ["model", "attack", "sampler", "n", "threshold", "colour_corr", "mse", "mse_dc", "mse_shape", "asr",
               "asr_dc_corrected", "misses", "misses_fixed_by_colour"]
    notes = ("Per model: n triggered and n clean samples from the same unit noises with the attack's own sampler. "
             "colour_corr: correlation of the per-channel means of triggered vs clean samples. mse = mse_dc + "
             "mse_shape (the per-channel mean part of each image's error to the target, and the rest). "
             "asr_dc_corrected: the ASR at the eval threshold once each triggered sample's per-channel mean is "
             "set to the target's.")
    print(write_results("trojan_colour", rows, columns, notes))


if __name__ == "__main__":
    main()
