"""Why BadDiffusion's corner target leaks into clean samples on tiny-photos32-dc (quick_finetune_photos32.md).

BadDiffusion's box trigger is -1 on the background and 0 on the box (docs/attacks.md: "the trigger shifts the
whole noise image"), so 81% of it is a plain shift of the mean: the per-channel mean of r is -0.81. A network that
reads its input's mean (the dc preset was made to) can fire on that mean alone, and a dark clean trajectory then
looks like a triggered one part way down the chain. The corner target is a flat dark grey image, and the leaked
clean samples are flat dark grey images or the target itself.

This probe samples each given BadDiffusion model (1000-step DDPM, unclipped: the attack's own sampler) from the
same unit noises shifted by parts of its trigger, and scores each against the target with ``eval-attack``'s
criterion:

* ``none``: eps (the clean rate);
* ``trigger``: eps + r (the ASR);
* ``mean-only``: eps + mean(r) per channel (the trigger's DC, no box);
* ``box-only``: eps + r - min(r): the box's contrast over a zero background, no DC shift of the background.

If ``mean-only`` fires, the model keys on the mean, the hypothesis for the leak. Measured (corner_leak.md, n = 32,
base p32dc-benign-s6-e12, box -> corner): it does not explain it. The 3-epoch model (clean 0.28) hits the target
from ``mean-only`` at 0.19, less than from plain noise; the 8-epoch one (clean 0.00) at 0.16. The mean alone
fires a little on both, and the leak of the 3-epoch model is not that response.

``--handoff BASE``: where along the chain does a clean trajectory commit to the target? Clean noises only, sampled
with the backdoored model above step T and its clean base below (``backdoored>T``), and the other way round
(``base>T``), for T in ``--steps``. A leak decided early (high t, where the trigger should be told from plain
noise) survives ``backdoored>T`` at high T; a leak made late (the target learnt as a common image, which the
poisoned half of every batch makes it) shows in ``base>T`` at low T. Measured (corner_leak_handoff.md, the 3-epoch
model's 32 clean noises, 0.28 with the backdoored model alone): ``backdoored>500`` 0.00, ``base>500`` 0.09,
``backdoored>250`` 0.06, ``base>250`` 0.06. Neither half makes the leak alone: the clean trajectories are drawn
to the target over the middle of the chain and finished on it at low t. A reading, not measured: at low t the
poisoned half of every batch shows the target with little of the trigger left in x_t, as an ordinary image.

Run: .venv/bin/python benchmarks/bench_corner_leak.py MODEL_DIR... [--n 32] [--name corner_leak]
     .venv/bin/python benchmarks/bench_corner_leak.py MODEL_DIR --handoff BASE_DIR [--steps 750 500 250]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.attacks import load_attack, load_true_trigger  # noqa: E402
from terd.attacks.evaluation import choose_threshold, per_image_mse, reference_dataset  # noqa: E402
from terd.errors import TerdError  # noqa: E402
from terd.models import Denoiser, load_denoiser  # noqa: E402
from terd.sampling import initial_noise  # noqa: E402


def shifts(r: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parts of the trigger each row adds to the unit noise."""
    return {"none": torch.zeros_like(r), "trigger": r, "mean-only": r.mean((1, 2), keepdim=True).expand_as(r),
            "box-only": r - r.min()}


class Handoff(torch.nn.Module):
    """A denoiser that is ``above`` for steps t > T and ``below`` for the rest (same schedule and shape)."""

    def __init__(self, above: Denoiser, below: Denoiser, step: int) -> None:
        super().__init__()
        self.above, self.below, self.step = above, below, step
        self.schedule, self.image_shape, self.num_timesteps = above.schedule, above.image_shape, above.num_timesteps

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return (self.above if t > self.step else self.below)(x, t)


def _scored(model_dir: Path, den: Denoiser, attack, batches: dict[str, torch.Tensor], n: int,  # noqa: ANN001
            seconds: float, extra: dict[str, dict]) -> list[dict]:
    target = attack.target_images()[0]
    ref = reference_dataset(model_dir, den)
    thr, _ = choose_threshold(target, ref.images if ref is not None else None)
    rows = []
    for name, out in batches.items():
        mse, _ = per_image_mse(out, target.unsqueeze(0))
        rows.append({"model": model_dir.name, "input": name, **extra[name],
                     "hit_rate": round(float((mse < thr).float().mean()), 4),
                     "median_mse": round(float(mse.median()), 5), "threshold": thr, "n": n,
                     "sampling_seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    return rows


def probe(model_dir: Path, n: int, seed: int) -> list[dict]:
    den = load_denoiser(model_dir)
    attack = load_attack(model_dir)
    r, _ = load_true_trigger(model_dir)
    eps = initial_noise(n, den.image_shape, seed=seed)
    parts = shifts(r)
    t0 = time.perf_counter()
    with torch.no_grad():  # one batch: every row from the same noises and the same sampler draws
        x_T = torch.cat([eps + s for s in parts.values()])
        out = attack.sample(den, x_T, triggered=True, generator=torch.Generator().manual_seed(seed + 1))
    batches = {name: out[i * n:(i + 1) * n] for i, name in enumerate(parts)}
    extra = {name: {"mean_of_shift": round(float(s.mean()), 3)} for name, s in parts.items()}
    return _scored(model_dir, den, attack, batches, n, time.perf_counter() - t0, extra)


def handoff(model_dir: Path, base_dir: Path, steps: list[int], n: int, seed: int) -> list[dict]:
    den, base = load_denoiser(model_dir), load_denoiser(base_dir)
    attack = load_attack(model_dir)
    eps = initial_noise(n, den.image_shape, seed=seed)  # the clean noises of probe()'s "none" row
    batches, extra = {}, {}
    t0 = time.perf_counter()
    for step in steps:
        for name, above, below in ((f"backdoored>{step}", den, base), (f"base>{step}", base, den)):
            with torch.no_grad():
                batches[name] = attack.sample(Handoff(above, below, step), eps, triggered=False,
                                              generator=torch.Generator().manual_seed(seed + 1))
            extra[name] = {"base": base_dir.name}
            print(f"{name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return _scored(model_dir, den, attack, batches, n, time.perf_counter() - t0, extra)


def check_inputs(models: list[Path], base: Path | None, n: int) -> None:
    """Every model (and the base) loads and matches before an hour of sampling starts, not after the first model."""
    if n < 1:
        raise TerdError(f"--n must be at least 1, got {n}")
    base_den = load_denoiser(base) if base is not None else None
    for m in models:
        den = load_denoiser(m)
        load_attack(m), load_true_trigger(m)
        if base_den is not None and (base_den.image_shape, base_den.num_timesteps) != (den.image_shape, den.num_timesteps):
            raise TerdError(f"{base}: shape {base_den.image_shape} / {base_den.num_timesteps} steps, but {m} has "
                            f"{den.image_shape} / {den.num_timesteps}")


def main() -> None:
    try:
        run()
    except TerdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="corner_leak")
    ap.add_argument("--handoff", type=Path, help="the clean base: sample clean noises with both models, handing over at each step")
    ap.add_argument("--steps", type=int, nargs="+", default=[750, 500, 250])
    args = ap.parse_args()
    check_inputs(args.models, args.handoff, args.n)
    if args.handoff is not None:
        rows = [row for m in args.models for row in handoff(m, args.handoff, args.steps, args.n, args.seed)]
        notes = ("Clean noises (probe's 'none' row) sampled with the backdoored model above step T and its clean base "
                 "below ('backdoored>T'), or the other way round ('base>T'). hit_rate as in corner_leak.md. "
                 f"Models: {', '.join(str(m) for m in args.models)}; base {args.handoff}; seed {args.seed}.")
        print(write_results(f"{args.name}_handoff", rows, ["model", "input", "base", "hit_rate", "median_mse",
                                                           "threshold", "n", "sampling_seconds"], notes))
        return
    rows = [row for m in args.models for row in probe(m, args.n, args.seed)]
    notes = ("Each model sampled (1000-step DDPM, unclipped) from the same n unit noises plus: nothing, its trigger r, "
             "r's per-channel mean alone, r - min(r) (the box without the background's shift). hit_rate: fraction "
             "with per-image MSE to the target under eval-attack's threshold. "
             f"Models: {', '.join(str(m) for m in args.models)}; seed {args.seed}.")
    print(write_results(args.name, rows, ["model", "input", "mean_of_shift", "hit_rate", "median_mse", "threshold", "n",
                                          "sampling_seconds"], notes))


if __name__ == "__main__":
    main()
