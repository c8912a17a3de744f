"""How does an EDM-preconditioned VE model's x_0 prediction answer a VillanDiffusion trigger, and can a search see it?

Why: in VillanDiffusion's VE form (psi = 0) a poisoned input is x = y + sigma (eps + r) and the model is taught the
noise eps + r -- what a benign model predicts for sigma (eps + r) at large sigma anyway, so a loss on the noise
prediction (TERD's) is blind there (edm_band_reversion.md). The backdoor changes the x_0 prediction (the target
instead of what the input suggests). Two statistics of the shift's effect dD(r) = mean_eps x0_hat(eps + r) -
mean_eps x0_hat(eps) (fixed draws, x_t = sqrt(1 - abar_t) z):

- response ||dD(r)||: how far the prediction moves;
- monotonicity dD(r) . r / ||r||^2: an exact posterior-mean denoiser is the gradient of a convex function (its
  Jacobian is the posterior covariance over sigma^2), so it never moves against a shift: this is >= 0 for any r.
  A backdoor sends its trigger to a target unrelated to r, which can move against it.

Each is read at the true trigger (box-white, background -1: ||r|| = 16 at 16 px), a uniform -1 shift and random
signs of the same norm; then a search looks for the least monotone r of the trigger's norm (r = 16 u / ||u||,
Adam lr 0.05, 100 steps of 16 draws, seed 0): a backdoor would be seen if it found a lower value on the
backdoored model than on every benign one.

Models (built by terd's own CLI, one thread each; runs/ve/, not committed):
  terd train --preset tiny-digits16-ve --out runs/ve/ve-benign-s{0,1}-e40 --epochs 40 --seed {0,1}
  terd attack villan --base runs/ve/ve-benign-s0-e40 --out runs/ve/ve-villan-ode --epochs 16 --solver ode
Run: .venv/bin/python benchmarks/bench_edm_response.py   -> results/edm_response.{json,md}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import backdoor_under_test, noise_level, write_results  # noqa: E402

from terd.models import load_denoiser  # noqa: E402
from terd.sampling import predict_x0  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "runs/ve"
BACKDOORED = "ve-villan-ode"
BENIGN = ("ve-benign-s0-e40", "ve-benign-s1-e40")
TIMESTEPS = (999, 700)  # sigma 20 and ~2.6
STEPS, LR, BATCH, EVAL_N = 100, 0.05, 16, 128


def shift_effect(den, r: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """dD(r): the mean x_0 prediction with the shift less the one without, over the same draws."""
    abar = den.schedule.alphas_cumprod[t]
    tt = torch.full((len(eps),), t)

    def mean_x0(z: torch.Tensor) -> torch.Tensor:
        x = (1 - abar).sqrt() * z
        return predict_x0(x, den(x, tt), abar.view(1, 1, 1, 1)).mean(0)

    return mean_x0(eps + r) - mean_x0(eps)


def monotonicity(den, r: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    return (shift_effect(den, r, t, eps) * r).sum() / r.pow(2).sum()


def least_monotone(den, t: int, norm: float) -> torch.Tensor:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    u = (0.1 * torch.randn(den.image_shape, generator=g)).requires_grad_()
    opt = torch.optim.Adam([u], lr=LR)
    for _ in range(STEPS):
        eps = torch.randn(BATCH, *den.image_shape, generator=g)
        loss = monotonicity(den, norm * u / u.norm(), t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (norm * u / u.norm()).detach()


def main() -> None:
    torch.set_num_threads(1)
    names = (BACKDOORED, *BENIGN)
    success, true_r = backdoor_under_test(MODELS_DIR, names, BACKDOORED)
    norm = float(true_r.norm())
    signs = torch.randint(0, 2, true_r.shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    probes = {"true trigger": true_r, "uniform -1": -torch.ones_like(true_r), "random signs": signs * norm / signs.norm()}
    eps = torch.randn(EVAL_N, *true_r.shape, generator=torch.Generator().manual_seed(123))
    rows = []
    for t in TIMESTEPS:
        for name in names:
            den = load_denoiser(MODELS_DIR / name).freeze()
            t0 = time.perf_counter()
            found = least_monotone(den, t, norm)
            with torch.no_grad():
                row = {"t": t, "sigma": round(noise_level(den.schedule, t), 2), "model": name,
                       "ASR / clean": f"{success['asr']} / {success['clean_asr']}" if name == BACKDOORED else "–"}
                row |= {f"response, {k}": round(float(shift_effect(den, r, t, eps).norm()), 3) for k, r in probes.items()}
                row |= {f"monotonicity, {k}": round(float(monotonicity(den, r, t, eps)), 4) for k, r in probes.items()}
                row |= {"monotonicity, least found": round(float(monotonicity(den, found, t, eps)), 4),
                        "cos(found, true)": round(float(torch.nn.functional.cosine_similarity(
                            found.flatten(), true_r.flatten(), dim=0)), 3),
                        "seconds": round(time.perf_counter() - t0)}
            rows.append(row)
            print(row, flush=True)
    note = (f"dD(r) = mean x0_hat(eps + r) - mean x0_hat(eps) over {EVAL_N} fixed draws (pixels in [-1, 1], 16 x 16); "
            f"response ||dD||, monotonicity dD . r / ||r||^2 (>= 0 for an exact posterior-mean denoiser). Probes and "
            f"the search's r have the true trigger's norm {norm:.1f}; search: Adam lr {LR}, {STEPS} steps of {BATCH} "
            f"draws, minimising monotonicity. ASR / clean: the backdoored model's with its own sampler "
            f"({success['asr_sampler']}, n = 64 each, terd bench's measurement).")
    cols = ["t", "sigma", "model", "ASR / clean", *[f"response, {k}" for k in probes],
            *[f"monotonicity, {k}" for k in probes], "monotonicity, least found", "cos(found, true)", "seconds"]
    write_results("edm_response", rows, cols, notes=note)


if __name__ == "__main__":
    main()
