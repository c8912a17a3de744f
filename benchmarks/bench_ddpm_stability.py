"""Why BadDiffusion does not fire on tiny-photos32: its sampler diverges on the base model, triggered or not.

BadDiffusion's backdoor fires through the plain 1000-step DDPM sampler WITHOUT clipping the x_0 estimate
(attacks.md). This script follows that sampler on 8 noises per model and records, at a few timesteps, the
pixel std of x_t and the fraction of pixels outside [-1, 1]. A working sampler ends near the data's std with
few pixels outside; a diverging one keeps growing. For backdoored models the triggered run (x_T = eps + trigger)
is followed too, with the final MSE to the attack's target (pixels in [0, 1]; the ASR criterion is < 0.05).
Models: the photos32 base and the BadDiffusion box -> hat model fine-tuned 24 epochs from it, and the digits16
base and BadDiffusion model for contrast.

Needs the zoo caches runs/zoo-digits16 and runs/zoo-photos32.
Run: .venv/bin/python benchmarks/bench_ddpm_stability.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.attacks import load_attack  # noqa: E402
from terd.data import load_dataset  # noqa: E402
from terd.models import load_denoiser  # noqa: E402
from terd.sampling import ddpm_sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = [("runs/zoo-photos32/p32-benign-s0-e20", "photos32"), ("runs/zoo-photos32/p32-bd-box-hat-e24", "photos32"),
          ("runs/zoo-digits16/d16-benign-s0-e40", "digits16"), ("runs/zoo-digits16/d16-bd-box-hat", "digits16")]
N, CHECKPOINTS = 8, (999, 700, 500, 300, 0)


@torch.no_grad()
def follow(den, x: torch.Tensor, gen: torch.Generator) -> tuple[dict, torch.Tensor]:  # noqa: ANN001
    """Unclipped DDPM from x; x_t's std and out-of-range fraction at the checkpoints, and the final images."""
    trace = {}

    def record(t: int, x_t: torch.Tensor) -> None:
        if t in CHECKPOINTS:
            trace[t] = (round(float(x_t.std()), 3), round(float((x_t.abs() > 1).float().mean()), 3))

    return trace, ddpm_sample(den, x, generator=gen, clip_sample=False, callback=record)


def main() -> None:
    rows = []
    for path, dataset in MODELS:
        den = load_denoiser(ROOT / path)
        data_std = float(load_dataset(dataset).images.std())
        attack = load_attack(ROOT / path) if (ROOT / path / "attack.json").is_file() else None
        for triggered in (False, True) if attack else (False,):
            gen = torch.Generator().manual_seed(0)
            eps = torch.randn((N, *den.image_shape), generator=gen)
            trace, x0 = follow(den, attack.backdoor_inputs(eps) if triggered else eps, gen)
            row = {"model": Path(path).name, "input": "triggered" if triggered else "clean",
                   "data_std": round(data_std, 3)}
            row |= {f"std@t{t}": trace[t][0] for t in CHECKPOINTS} | {"outside_at_end": trace[0][1]}
            if attack is not None:
                target = (attack.target_images()[:1] + 1) / 2
                row["mse_to_target"] = round(float((((x0.clamp(-1, 1) + 1) / 2 - target) ** 2).mean()), 4)
            rows.append(row)
            print(row, flush=True)
    cols = ["model", "input", "data_std"] + [f"std@t{t}" for t in CHECKPOINTS] + ["outside_at_end", "mse_to_target"]
    write_results("ddpm_stability", rows, cols, notes=(
        f"Unclipped 1000-step DDPM (BadDiffusion's sampler), {N} noises per row, same noises for clean and triggered. "
        "std@tT: pixel std of x_t after the step to t (x_0 at t0); outside_at_end: fraction of final pixels outside "
        "[-1, 1]; data_std: the training images' pixel std. mse_to_target: mean over the 8 final images (clamped to "
        "[-1, 1], mapped to [0, 1]) of the MSE to the attack's target."))


if __name__ == "__main__":
    main()
