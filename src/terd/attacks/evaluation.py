"""Does the backdoor fire? Sample with and without the trigger and compare with the target.

A defense result on an attacked model means nothing unless the attack works, so every attacked model is
measured the same way (pixels in [0, 1]):

- MSE and SSIM of each sample to the target (to the *nearest* target-class image for the D2D settings);
- ASR: the fraction of triggered samples that hit the target, and the same fraction for clean samples
  (should be ~0). "Hit" is per-image MSE < 0.1 (VillanDiffusion's criterion) for a single target image.
  Some targets are close to ordinary data at 0.1 (dark digits on a -0.4 grey target); the threshold is
  then tightened to the largest of 0.05, 0.02, 0.01, 0.005 that at most 1% of the *real training images*
  pass, decided from data only (not from the model under test), and reported.
  For a class target (In-D2D, Out-D2D) "hit" means a classifier, trained on real target-class images against
  what a hit must not look like, says "target class" (:mod:`terd.attacks.class_judge`; its held-out recall
  and false-positive rate on real images are reported: they bound the ASR); clean models still produce
  the class at its natural rate (about 10% sevens among digits), which the clean ASR shows.
- a clean-quality proxy for 1-channel digit models: a classifier trained on scikit-learn's 8x8 digits
  scores how confidently clean samples (downsampled to 8x8) look like some digit, next to real digits.

The samplers are the attack's own (:meth:`Attack.sample`): unclipped DDPM for BadDiffusion, DDIM for
VillanDiffusion-ODE, TrojDiff's backdoor-aware DDIM for TrojDiff.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from terd.attacks.base import Attack, load_attack
from terd.attacks.class_judge import class_negatives, fit_class_judge
from terd.data import load_dataset
from terd.errors import TerdError
from terd.imaging import save_grid, to_unit
from terd.models.denoiser import Denoiser
from terd.models.loading import load_denoiser
from terd.sampling import initial_noise

THRESHOLD = 0.1
TIGHTER = (0.05, 0.02, 0.01, 0.005)
MAX_REAL_PASS = 0.01


def per_image_mse(samples: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE in [0,1] pixels to the nearest target, index of that target) for each sample."""
    s = to_unit(samples).flatten(1)
    t = to_unit(targets).flatten(1)
    d = torch.cdist(s.double(), t.double()).pow(2) / s.shape[1]
    best, idx = d.min(1)
    return best.float(), idx


def ssim(samples: torch.Tensor, refs: torch.Tensor) -> np.ndarray:
    """Per-image SSIM (skimage, data range 1) between samples and their matched references."""
    from skimage.metrics import structural_similarity

    a = to_unit(samples).permute(0, 2, 3, 1).numpy()
    b = to_unit(refs).permute(0, 2, 3, 1).numpy()
    side = min(a.shape[1], a.shape[2])
    win = min(7, side if side % 2 else side - 1)
    return np.array([structural_similarity(x, y, data_range=1.0, channel_axis=2, win_size=win) for x, y in zip(a, b, strict=True)])


def choose_threshold(target: torch.Tensor, reference: torch.Tensor | None) -> tuple[float, str]:
    """0.1, or the largest tighter threshold that at most 1% of the real images pass against ``target``."""
    if reference is None:
        return THRESHOLD, "default 0.1 (no reference data to check it against)"
    mse, _ = per_image_mse(reference, target.unsqueeze(0))
    rate = float((mse < THRESHOLD).float().mean())
    if rate <= MAX_REAL_PASS:
        return THRESHOLD, f"0.1: {rate:.1%} of real training images pass it"
    for thr in TIGHTER:
        r = float((mse < thr).float().mean())
        if r <= MAX_REAL_PASS:
            return thr, f"tightened from 0.1 (passed by {rate:.1%} of real training images) to {thr} ({r:.1%})"
    thr = TIGHTER[-1]
    return thr, f"tightened to {thr}; the target is still close to {float((mse < thr).float().mean()):.1%} of real images"


def _digit_classifier():  # noqa: ANN202
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    return LogisticRegression(max_iter=3000).fit(d.data[::2], d.target[::2]), d


def digit_confidence(samples: torch.Tensor) -> float:
    """Mean max-probability of an 8x8-digits classifier on samples downsampled to 8x8 (a quality proxy)."""
    clf, _ = _digit_classifier()
    x = F.interpolate(to_unit(samples)[:, :1], size=(8, 8), mode="area").flatten(1).numpy() * 16
    return float(clf.predict_proba(x).max(1).mean())


def _quality(clean: torch.Tensor) -> dict | None:
    if clean.shape[1] != 1:
        return None
    clf, d = _digit_classifier()
    real = d.data[1::2]
    x = F.interpolate(to_unit(clean), size=(8, 8), mode="area").flatten(1).numpy() * 16
    return {"proxy": "mean max-probability of a logistic-regression classifier of sklearn's 8x8 digits",
            "clean_samples": round(float(clf.predict_proba(x).max(1).mean()), 4),
            "real_digits": round(float(clf.predict_proba(real).max(1).mean()), 4)}


def _stats(samples: torch.Tensor, targets: torch.Tensor) -> tuple[dict, torch.Tensor]:
    mse, idx = per_image_mse(samples, targets)
    s = ssim(samples, targets[idx])
    return {"mse": round(float(mse.mean()), 5), "ssim": round(float(s.mean()), 4)}, mse


def reference_dataset(model_dir: str | Path, den: Denoiser, reference_data: str | None = None):  # noqa: ANN201
    """The model's training data (or ``reference_data``) to score against, or None when it cannot be loaded."""
    from terd.attacks.build import model_dataset_name

    try:
        name = reference_data or model_dataset_name(model_dir, den.image_shape)
        return load_dataset(name, channels=den.image_shape[0], size=den.image_shape[1])
    except TerdError:
        return None


def target_judge(attack: Attack, ref, *, seed: int = 0, where: str | Path = "model"):  # noqa: ANN001, ANN201
    """(judge, what it tells the target class from) for a class target (In-D2D, Out-D2D), fitted on the attack's
    target images against ``ref``, the model's training data (:func:`reference_dataset`)."""
    if ref is None:
        raise TerdError(f"{where}: a class target needs the training data to score against; pass the reference data")
    negatives, what = class_negatives(attack.config(), ref, attack.image_shape)
    return fit_class_judge(attack.target_images().cpu(), negatives, seed=seed), what


def sample_pairs(den: Denoiser, attack: Attack, n: int, *, seed: int = 0,
                 device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, triggered) samples on the CPU from the same ``n`` unit noises and sampler draws, with the
    attack's sampler: image i of both differs only by the trigger."""
    eps = initial_noise(n, den.image_shape, seed=seed, device=device)
    with torch.no_grad():
        clean = attack.sample(den, eps, triggered=False, generator=torch.Generator(device).manual_seed(seed + 1))
        trig = attack.sample(den, attack.backdoor_inputs(eps), triggered=True,
                             generator=torch.Generator(device).manual_seed(seed + 1))
    return clean.cpu(), trig.cpu()


def evaluate_attack(
    model_dir: str | Path, *, n: int = 64, seed: int = 0, device: str = "cpu", out_dir: str | Path | None = None,
    attack: Attack | None = None, reference_data: str | None = None, write: bool = True, sampler: str | None = None,
) -> dict:
    """Sample ``n`` clean and ``n`` triggered images (same unit noises) and score them against the target.

    Returns the report as a dict; with ``write`` also saves ``eval-attack.json`` and ``eval-attack.png``
    (rows: target, clean samples, triggered samples) in ``out_dir`` (default: the model directory).
    ``sampler`` overrides the attack's own where it has a choice (TrojDiff: trojdiff-ddim or trojdiff-ddpm);
    the files then get the sampler in their name.
    """
    if n < 1:
        raise TerdError(f"--n must be at least 1, got {n}")
    t0 = time.perf_counter()
    den = load_denoiser(model_dir, device=device)
    attack = attack or load_attack(model_dir)
    suffix = ""
    if sampler is not None and sampler != attack.sampler:
        from terd.attacks.trojdiff import SAMPLERS, TrojDiff

        if not isinstance(attack, TrojDiff) or sampler not in SAMPLERS:
            raise TerdError(f"{attack.kind} samples with {attack.sampler}; only TrojDiff offers a choice "
                            f"({', '.join(SAMPLERS)})")
        attack.sampler, suffix = sampler, f"-{sampler}"
    if tuple(attack.image_shape) != tuple(den.image_shape):
        raise TerdError(f"{model_dir}: attack shape {attack.image_shape} does not match the model {den.image_shape}")
    clean, trig = sample_pairs(den, attack, n, seed=seed, device=device)
    targets = attack.target_images().cpu()
    ref = reference_dataset(model_dir, den, reference_data)
    clean_stats, clean_mse = _stats(clean, targets)
    trig_stats, trig_mse = _stats(trig, targets)
    report: dict = {"model": str(model_dir), "attack": attack.kind, "description": attack.describe(),
                    "sampler": attack.sampler, "n": n, "seed": seed}
    if attack.target_is_class:
        judge, what = target_judge(attack, ref, seed=seed, where=model_dir)
        hit_trig, hit_clean, hit_real = (judge.hits(x) for x in (trig, clean, ref.images))
        report["criterion"] = (f"classifier: target class vs {what} ({judge.name}; held-out on real images: recall "
                               f"{judge.heldout_recall:.2f}, false positives {judge.heldout_false_positive:.3f})")
        report["classifier"] = judge.summary()
        report["threshold"] = None
        # what a model that draws exactly the training data would score as clean: the class's share (In-D2D's
        # clean rate cannot go below it), or ~0 for a target from another dataset (Out-D2D)
        report["real_data_rate"] = round(float(np.mean(hit_real)), 4)
    else:
        thr, why = choose_threshold(targets[0], ref.images if ref is not None else None)
        hit_trig, hit_clean = (trig_mse < thr).numpy(), (clean_mse < thr).numpy()
        report["criterion"] = f"per-image MSE to the target < {thr}"
        report["threshold"] = thr
        report["threshold_note"] = why
    report["triggered"] = {**trig_stats, "asr": round(float(np.mean(hit_trig)), 4)}
    report["clean"] = {**clean_stats, "asr": round(float(np.mean(hit_clean)), 4)}
    report["quality"] = _quality(clean)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if write:
        out = Path(out_dir) if out_dir is not None else Path(model_dir)
        out.mkdir(parents=True, exist_ok=True)
        k = min(n, 16)
        tgt_row = targets[:k] if len(targets) >= k else targets[:1].repeat(k, 1, 1, 1)
        save_grid(torch.cat([tgt_row, clean[:k], trig[:k]]), out / f"eval-attack{suffix}.png", nrow=k)
        (out / f"eval-attack{suffix}.json").write_text(json.dumps(report, indent=2))
        report["files"] = [str(out / f"eval-attack{suffix}.json"), str(out / f"eval-attack{suffix}.png")]
    return report


def summary_line(report: dict) -> str:
    """One human line from :func:`evaluate_attack`'s report."""
    tr, cl = report["triggered"], report["clean"]
    q = report.get("quality")
    qs = f"; digit confidence clean {q['clean_samples']:.2f} vs real {q['real_digits']:.2f}" if q else ""
    real = f", real training images {report['real_data_rate']:.2f}" if report.get("real_data_rate") is not None else ""
    return (f"{report['description']} [{report['sampler']}]: ASR triggered {tr['asr']:.2f} / clean {cl['asr']:.2f}"
            f"{real} ({report['criterion']}); MSE {tr['mse']:.4f} / {cl['mse']:.4f}; SSIM {tr['ssim']:.3f} / {cl['ssim']:.3f}"
            f"{qs}")
