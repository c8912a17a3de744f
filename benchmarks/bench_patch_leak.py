"""Where do a TrojDiff patch model's clean target hits come from? Clean hit rate by how trigger-like the noise is.

The digits16 In-D2D model with TrojDiff's 2 x 2 white patch (attacks_digits16.md, troj-in-d2d-patch) draws the
target class from 0.34 of clean noises, against 0.11 for the clean base. Its trigger sets the patch's pixels of
x_T to ~0.9 (gamma 0.1); plain N(0, I) noise puts a patch mean above 0.5 about one time in six. If the model
fires on noise that merely looks bright where the patch goes, the clean hits concentrate in the brightest
quartile of that patch mean; if it has learned a general bias towards the target, they spread evenly. The clean
base, sampled from the same noises and scored by the same judge, is the control.

Run (after bench_attacks.py built troj-in-d2d-patch):
    .venv/bin/python benchmarks/bench_patch_leak.py [--model runs/attacks/troj-in-d2d-patch] [--n 256]
Writes benchmarks/results/patch_leak.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_attacks import BASE, ROOT, RUNS
from common import machine

from terd.attacks import load_attack
from terd.attacks.evaluation import reference_dataset, target_judge
from terd.errors import TerdError
from terd.models import load_denoiser
from terd.sampling import initial_noise

OUT = ROOT / "benchmarks/results/patch_leak"
QUARTILES = 4


def clean_hits(model_dir: Path, attack, judge, eps: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:  # noqa: ANN001
    """Which clean samples (plain sampler, from ``eps``) ``judge`` calls the target; seconds."""
    t0 = time.perf_counter()
    den = load_denoiser(model_dir)
    with torch.no_grad():
        clean = attack.sample(den, eps, triggered=False, generator=torch.Generator().manual_seed(seed + 1)).cpu()
    return torch.as_tensor(judge.hits(clean)).bool(), time.perf_counter() - t0


def by_quartile(score: torch.Tensor, hits: torch.Tensor) -> list[dict]:
    """Hit rate in each quartile of ``score`` (lowest first)."""
    order = score.argsort()
    rows = []
    for q, idx in enumerate(order.chunk(QUARTILES)):
        rows.append({"quartile": q + 1, "patch_mean_range": [round(float(score[idx].min()), 3),
                                                            round(float(score[idx].max()), 3)],
                     "n": len(idx), "clean_hit_rate": round(float(hits[idx].float().mean()), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=RUNS / "troj-in-d2d-patch")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", action="store_true", help="rewrite the markdown from the recorded JSON only")
    args = ap.parse_args()
    if args.render:
        OUT.with_suffix(".md").write_text(write_markdown(json.loads(OUT.with_suffix(".json").read_text())))
        return
    try:
        attack = load_attack(args.model)
    except (TerdError, OSError, ValueError) as exc:
        ap.error(f"{args.model}: not a terd attack model ({exc})")
    if getattr(attack, "trigger_type", None) != "patch" or not attack.target_is_class:
        ap.error(f"{args.model}: needs a TrojDiff patch model with a class target (In-D2D / Out-D2D), got "
                 f"{attack.describe()}")
    # one judge for both models: the same attack and training data (digits16)
    judge, _ = target_judge(attack, reference_dataset(args.model, load_denoiser(args.model)), seed=args.seed,
                            where=args.model)
    mask = attack.true_trigger()[0] != 0  # the patch: where the trigger shifts the noise
    eps = initial_noise(args.n, attack.image_shape, seed=args.seed)
    patch_mean = eps[:, mask].mean(1)
    result = {"model": str(args.model.relative_to(ROOT)) if args.model.is_relative_to(ROOT) else str(args.model),
              "attack": attack.describe(), "sampler": attack.sampler, "n": args.n, "seed": args.seed,
              "patch_elements": int(mask.sum()), "machine": machine(),
              "models": {}}
    for name, where in (("backdoored", args.model), ("clean base", BASE)):
        hits, seconds = clean_hits(where, attack, judge, eps, args.seed)
        result["models"][name] = {"clean_hit_rate": round(float(hits.float().mean()), 4), "seconds": round(seconds, 1),
                                  "quartiles": by_quartile(patch_mean, hits)}
        print(f"{name}: clean hit rate {result['models'][name]['clean_hit_rate']} ({seconds:.0f} s)", flush=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=2))
    OUT.with_suffix(".md").write_text(write_markdown(result))


def write_markdown(result: dict) -> str:
    n = result["n"]
    lines = ["# patch_leak", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Model `{result['model']}`: {result['attack']}, sampler {result['sampler']}; {n} clean noises "
             f"(seed {result['seed']}), the patch's {result['patch_elements']} elements of x_T averaged; the same "
             "noises and sampler draws for both models.", "",
             "| patch-mean quartile | range | n | clean hit rate, backdoored | clean hit rate, clean base |",
             "|---|---|---|---|---|"]
    bd, base = result["models"]["backdoored"], result["models"]["clean base"]
    for a, b in zip(bd["quartiles"], base["quartiles"], strict=True):
        lo, hi = a["patch_mean_range"]
        lines.append(f"| {a['quartile']} | {lo} to {hi} | {a['n']} | {a['clean_hit_rate']} | {b['clean_hit_rate']} |")
    lines.append(f"| all | | {n} | {bd['clean_hit_rate']} | {base['clean_hit_rate']} |")
    rates = [q["clean_hit_rate"] for q in bd["quartiles"]]
    rest = sum(rates[:-1]) / len(rates[:-1])
    lines += ["", f"Reading: the brightest quartile's clean hit rate is {rates[-1]:.2f} against {rest:.2f} over the "
              "other three (backdoored model): "
              + ("the hits concentrate where the noise looks like the trigger." if rates[-1] > 2 * rest else
                 "the hits do not concentrate where the noise looks like the trigger; the model draws the target "
                 "class more often from any noise.")]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
