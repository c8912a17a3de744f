"""Where along t can TERD's reversed loss see a trigger? The loss by timestep band, backdoored vs benign model.

TERD evaluates its "ending" term only at the last 10 steps. This script evaluates the same two-noise loss
(unit-noise target, K noises per x_0, surrogate x_0 ~ N(0, I)) in bands of 10 steps from t = 990 down to 200,
with the trigger's share c_t = sqrt(1 - abar_t) (exact for TrojDiff and for VillanDiffusion's VE form; 1 at the
ending band), for each pair of a backdoored model and its clean base, at: the benign point (r = 0, gamma = 1), the
true trigger, twice the true r, minus the true r, and a random r of the true trigger's norm (gamma the true one).
Lower loss = what reversion prefers. For a trigger on few pixels (the TrojDiff patch) the loss on those pixels is
listed too. Every point sees the same draws (common random numbers).

The pairs (models are not committed; build them with terd's own commands):
  reference, where TERD works: TrojDiff D2I blend (the shipped demo-trojdiff) vs digits-benign (shipped);
  the TrojDiff 2x2 patch on tiny-digits16:
    terd attack trojdiff --base src/terd/assets/models/digits-benign --out runs/patch24 --setting d2i \\
        --trigger patch --epochs 24 --seed 0
  VillanDiffusion ODE on an EDM-preconditioned VE model (zoo-digits16-ve.yaml's ve-benign-s0-e40 / ve-villan-ode):
    terd train --preset tiny-digits16-ve --seed 0 --epochs 40 --out runs/zoo-digits16-ve/ve-benign-s0-e40
    terd attack villan --base runs/zoo-digits16-ve/ve-benign-s0-e40 --out runs/zoo-digits16-ve/ve-villan-ode \\
        --epochs 16 --seed 0 --solver ode
Run: .venv/bin/python benchmarks/bench_loss_bands.py   -> results/loss_bands.{json,md}
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import noise_level, write_results  # noqa: E402

from terd.attacks import load_true_trigger  # noqa: E402
from terd.bench import attack_success  # noqa: E402
from terd.defense.loss import noisy_inputs  # noqa: E402
from terd.models import load_denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src/terd/assets/models"
PAIRS = (
    ("TrojDiff D2I blend (VP, reference)", ASSETS / "demo-trojdiff", ASSETS / "digits-benign"),
    ("TrojDiff D2I 2x2 patch (VP)", ROOT / "runs/patch24", ASSETS / "digits-benign"),
    ("VillanDiffusion ODE (VE, EDM)", ROOT / "runs/zoo-digits16-ve/ve-villan-ode",
     ROOT / "runs/zoo-digits16-ve/ve-benign-s0-e40"),
)
BANDS = (990, 950, 900, 850, 800, 700, 600, 500, 400, 300, 200)  # each band is [t, t + 10)
BATCH, NOISES, SEED = 32, 4, 0
FEW_PIXELS = 0.1  # a trigger on at most this fraction of the dimensions gets its own loss column


def band_loss(den, r, gamma, x0, t, eps, mask) -> tuple[float, float | None]:  # noqa: ANN001
    """The two-noise loss (mean over x_0, sum over pixels) at trigger share sqrt(1 - abar_t), and its part on mask."""
    abar = den.schedule.alphas_cumprod
    share = (1 - abar[t]).sqrt().view(1, -1, 1, 1, 1)  # per-sample trigger share, broadcast like a scalar c
    x_t = noisy_inputs(x0, t, eps, r, gamma, share, abar)
    with torch.no_grad():
        pred = den(x_t.reshape(NOISES * BATCH, *x0.shape[1:]), t.repeat(NOISES)).view_as(eps)
    d = eps - pred
    per_dim = (d - d.mean(0, keepdim=True)).pow(2).sum(0).div(NOISES - 1).mean(0)
    return float(per_dim.sum()), (float(per_dim[mask].sum()) if mask is not None else None)


def main() -> None:
    rows = []
    for label, backdoored, benign in PAIRS:
        if not (backdoored / "model_index.json").is_file() or not (benign / "model_index.json").is_file():
            print(f"skipping {label}: build {backdoored} and {benign} first (see this script's docstring)")
            continue
        success = attack_success(backdoored)  # a backdoor that does not fire says nothing about the loss
        asr = f"{success['asr']} / {success['clean_asr']} ({success['asr_sampler']})"
        print(label, "ASR / clean:", asr, flush=True)
        dens = {"backdoored": load_denoiser(backdoored).freeze(), "benign": load_denoiser(benign).freeze()}
        true_r, true_g = load_true_trigger(backdoored)
        shape = tuple(true_r.shape)
        touched = (true_g != 1) | (true_r != 0)
        mask = touched if touched.float().mean() <= FEW_PIXELS else None
        rand = torch.randn(shape, generator=torch.Generator().manual_seed(SEED + 1))
        points = {"r 0": (torch.zeros(shape), torch.ones(shape)), "true": (true_r, true_g),
                  "2 x true r": (2 * true_r, true_g), "-true r": (-true_r, true_g),
                  "random r, same norm": (rand * true_r.norm() / rand.norm(), true_g)}
        g = torch.Generator().manual_seed(SEED)
        x0 = torch.randn((BATCH, *shape), generator=g)
        eps = torch.randn((NOISES, BATCH, *shape), generator=g)
        for low in BANDS:
            t = torch.randint(low, low + 10, (BATCH,), generator=g)
            row = {"pair": label, "ASR / clean": asr, "band": f"{low}-{low + 9}",
                   "sigma": round(noise_level(dens["benign"].schedule, low + 5), 2)}
            for model, den in dens.items():
                for name, (r, gamma) in points.items():
                    total, on_mask = band_loss(den, r, gamma, x0, t, eps, mask)
                    row[f"{model}: {name}"] = round(total, 3)
                    if on_mask is not None and name in ("r 0", "true"):
                        row[f"{model}: {name}, trigger pixels"] = round(on_mask, 3)
            rows.append(row)
            print(row, flush=True)
    first = ["pair", "ASR / clean", "band", "sigma"]
    columns = first + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in first]
    note = (f"Two-noise reversed loss (sum over pixels, mean over {BATCH} surrogate x_0 ~ N(0, I), {NOISES} noises each, "
            f"seed {SEED}) per band of 10 timesteps, trigger share sqrt(1 - abar_t); sigma = sqrt((1 - abar)/abar) at "
            "the band's middle (a VE model's own noise level). Columns: model (backdoored or its clean base) and the "
            "point (r, gamma) evaluated; 'trigger pixels' is the part of the loss on the pixels the trigger touches "
            "(TrojDiff patch: 4 of 256). Lower = what reversion prefers. ASR / clean: the backdoored model's attack "
            "success with the best of its attack's samplers (n = 64 each, terd bench's measurement).")
    write_results("loss_bands", rows, columns, notes=note)


if __name__ == "__main__":
    main()
