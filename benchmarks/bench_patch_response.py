"""How a TrojDiff 2x2 patch model responds to its patch window's value: what the patch probe relies on.

On the patch probe's development model (runs/patch24, recipe in bench_patch_probe.py), the window (the true
patch) is set to v + 0.1 eps and the rest is benign unit noise. Per v: the model's mean noise prediction on the
window at t = T-1 (a pure denoiser predicts ~v there; a model that learned the trigger's mean removes it), the
explained offset v - that mean (what the probe maximises), and the attack success of plain 10-step DDIM from
such inputs (per-image MSE to the target < 0.1; the target is the median triggered sample of TrojDiff's own
sampler), i.e. which window values fire the backdoor.
Run: .venv/bin/python benchmarks/bench_patch_response.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.attacks import load_true_trigger  # noqa: E402
from terd.attacks.trojdiff import trojdiff_ddim_sample  # noqa: E402
from terd.models import load_denoiser  # noqa: E402
from terd.sampling import ddim_sample  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "runs/patch24"
VALUES = tuple(i / 10 for i in range(-10, 31, 1))
N_MEAN, N_ASR, GAMMA = 128, 32, 0.1


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(2)
    den = load_denoiser(MODEL)
    r, g = load_true_trigger(MODEL)
    window = (g != 1) | (r != 0)
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn((N_ASR, *den.image_shape), generator=gen)
    target = trojdiff_ddim_sample(den, g * eps + r, g, r).clamp(-1, 1).median(0).values
    x = torch.randn((N_MEAN, *den.image_shape), generator=gen)
    e = torch.randn((N_MEAN, *den.image_shape), generator=gen)
    t_last = torch.full((N_MEAN,), den.num_timesteps - 1)
    rows = []
    for v in VALUES:
        pred = den(torch.where(window, v + GAMMA * e, x), t_last)[:, window].mean().item()
        imgs = ddim_sample(den, torch.where(window, v + GAMMA * eps, eps), steps=10).clamp(-1, 1)
        asr = float(((((imgs - target) / 2) ** 2).flatten(1).mean(1) < 0.1).double().mean())
        rows.append({"v": v, "mean_prediction": round(pred, 4), "explained_offset": round(v - pred, 4),
                     "ddim_asr": round(asr, 4)})
        print(rows[-1], flush=True)
    write_results("patch_response", rows, ["v", "mean_prediction", "explained_offset", "ddim_asr"], notes=(
        f"Model {MODEL.name} (TrojDiff D2I, 2x2 white patch, true window value 0.9, gamma 0.1). Window = the true "
        f"patch set to v + {GAMMA} eps, rest benign unit noise. mean_prediction: the model's mean eps_theta on the "
        f"window at t = T-1 over {N_MEAN} noises; explained_offset = v - mean_prediction; ddim_asr: fraction of "
        f"{N_ASR} plain 10-step DDIM samples from such inputs within per-image MSE 0.1 of the target."))


if __name__ == "__main__":
    main()
