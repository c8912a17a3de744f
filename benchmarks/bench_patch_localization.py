"""Can the model itself point at a small patch trigger that TERD's reversion misses? (a probe, not in terd)

Every reversion candidate misses the TrojDiff 2x2 patch on tiny-digits16: the reversed loss has no minimum at
the true trigger (patch_anatomy_grid_digits16.md). This probe asks the model directly. At t = T a model
predicts about the noise it sees, so the residual eps_theta(x, T-1) - x over benign noise x is small and alike at
every pixel; on pixels a backdoor was poisoned on, the model reacts to the values it was trained to treat
specially, and the residual's per-pixel spread stands out. The window is the pixels whose spread exceeds 4x the
median pixel's (the cut set from the 24-epoch patch model and the three digits16 calibration benign models,
seeds 1-3). Inside a window, one shared mean is searched at a fixed low gamma by the two-noise ending loss on
the window (bench_patch_anatomy.loss_split, same draws for every mean), and the resulting N(mean, gamma^2)
candidate is scored as an input detector at the bench's even share of the FPR budget (3 candidates).

Needs the zoo caches runs/zoo-digits16, runs/zoo-photos32 and runs/attacks/troj-d2i-patch-36ep.
Run: .venv/bin/python benchmarks/bench_patch_localization.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_patch_anatomy import BATCH, NOISES, loss_split  # noqa: E402
from common import write_results  # noqa: E402

from terd.attacks import load_true_trigger  # noqa: E402
from terd.bench import INPUT_FPR  # noqa: E402
from terd.defense.input_detection import InputDetector  # noqa: E402
from terd.defense.loss import ENDING, term_timesteps  # noqa: E402
from terd.defense.trigger import Trigger  # noqa: E402
from terd.models import load_denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "runs/zoo-digits16").iterdir()) + [ROOT / "runs/attacks/troj-d2i-patch-36ep"] \
    + sorted((ROOT / "runs/zoo-photos32").iterdir())
RESPONSE_NOISES, RATIO_CUT, MAX_WINDOW_FRACTION = 1024, 4.0, 0.05
PROBE_GAMMAS = (0.1, 0.2, 0.3)
MEANS = tuple(round(-2.0 + 0.1 * i, 1) for i in range(41))
SHARE = INPUT_FPR / 3  # the fast scan's two candidates plus this one


@torch.no_grad()
def response_spread(den, seed: int = 0, batch: int = 256) -> torch.Tensor:  # noqa: ANN001
    """Per-element std of eps_theta(x, T-1) - x over benign unit noises x (C, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    res = []
    for _ in range(RESPONSE_NOISES // batch):
        x = torch.randn((batch, *den.image_shape), generator=gen)
        res.append(den(x, torch.full((batch,), den.num_timesteps - 1)) - x)
    return torch.cat(res).std(0)


def window_mean(den, mask: torch.Tensor, gamma: float, seed: int = 1) -> float:  # noqa: ANN001
    """The shared window mean with the lowest two-noise ending loss on the window (common draws for all means)."""
    gen = torch.Generator().manual_seed(seed)
    draws = (torch.randn((BATCH, *den.image_shape), generator=gen),
             term_timesteps(ENDING, den.num_timesteps, BATCH, gen),
             torch.randn((NOISES, BATCH, *den.image_shape), generator=gen))
    losses = {m: loss_split(den, mask * m, torch.where(mask, gamma, 1.0), mask, draws)[0] for m in MEANS}
    return min(losses, key=losses.get)


def main() -> None:
    rows = []
    for path in MODELS:
        if not (path / "model_index.json").is_file():
            continue
        den = load_denoiser(path)
        ratio = response_spread(den)
        ratio = ratio / ratio.median()
        mask = ratio > RATIO_CUT
        attacked = (path / "true_trigger.safetensors").is_file()
        row = {"model": path.name, "backdoored": attacked, "ratio_max": round(float(ratio.max()), 2),
               "window": int(mask.sum())}
        if attacked:
            r_true, g_true = load_true_trigger(path)
            support = (g_true != 1) | (r_true != 0)
            row["true_support"] = int(support.sum())
            row["window_is_true_support"] = bool(mask.any() and torch.equal(mask, support))
        if mask.any() and mask.sum() <= MAX_WINDOW_FRACTION * mask.numel():
            for g in PROBE_GAMMAS:
                m = window_mean(den, mask, g)
                row[f"mean@{g}"] = m
                det = InputDetector(Trigger(mask * m, torch.where(mask, g, 1.0)), fpr=SHARE)
                row[f"own_tpr@{g}"] = round(det.expected_tpr(), 4)
                if attacked:
                    row[f"true_tpr@{g}"] = round(det.detection_rate(r_true, g_true), 4)
        rows.append(row)
        print(row, flush=True)
    cols = ["model", "backdoored", "ratio_max", "window", "true_support", "window_is_true_support"]
    cols += [f"{k}@{g}" for g in PROBE_GAMMAS for k in ("mean", "own_tpr", "true_tpr")]
    write_results("patch_localization", rows, cols, notes=(
        f"ratio_max: the largest per-pixel spread of eps_theta(x, T-1) - x over {RESPONSE_NOISES} benign noises, "
        f"over the median pixel's; window: pixels over {RATIO_CUT}x (a window larger than "
        f"{MAX_WINDOW_FRACTION:.0%} of the image is not searched). true_support: pixels where the true trigger "
        "differs from N(0, 1). mean@g: the window mean the ending loss prefers with gamma g on the window; "
        f"own_tpr / true_tpr: that candidate's detector at FPR {SHARE:.2g} (an even share of the bench budget over "
        "three candidates) on its own inputs / on the true backdoor inputs. The fast scan's CandidateSetDetector "
        "would keep such a candidate only with own_tpr >= 0.5."))


if __name__ == "__main__":
    main()
