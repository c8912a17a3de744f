"""Where do a TrojDiff patch model's clean target hits come from? Clean hit rate by how trigger-like the chain is.

The digits16 In-D2D model with TrojDiff's 2 x 2 white patch (attacks_digits16.md, troj-in-d2d-patch) draws the
target class from 0.34 of clean noises, against 0.11 for the clean base. Its trigger sets the patch's pixels of
x_T to ~0.9 (gamma 0.1). Four readings, each over the same clean noises and sampler draws, scored by one judge:
(1) hit rate by quartile of x_T's own patch mean; (2) by quartile of the chain's patch z-score averaged over a
band of timesteps -- z_t = (patch of x_t + sqrt(abar_t)) / sqrt(1 - abar_t), the patch pixels against the digits'
black background noised to t, which the trigger holds at 0.9 and clean noise draws from N(0, 1); the DDPM sampler
adds fresh noise at every step, so x_T's patch says little about the patch the chain shows later; (3) the two
models swapped at t = 500 (one answers above, the other below): which half of the chain adds the hits; (4) the
patch reset: before every step the chain's patch pixels are overwritten with fresh noise on the black background,
so the model never sees a patch the chain made. If the hits fall to the base's rate, the patch drives them. The
clean base is the control in (1), (3) and (4).

Run (after bench_attacks.py built troj-in-d2d-patch):
    .venv/bin/python benchmarks/bench_patch_leak.py [--model runs/attacks/troj-in-d2d-patch] [--n 256]
Writes benchmarks/results/patch_leak.{json,md} (``--out NAME`` for another model: benchmarks/results/NAME.*).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from bench_attacks import BASE, ROOT, RUNS
from common import machine, render_recorded

from terd.attacks import load_attack
from terd.attacks.evaluation import reference_dataset, target_judge
from terd.errors import TerdError
from terd.models import load_denoiser
from terd.sampling import initial_noise

OUT = ROOT / "benchmarks/results/patch_leak"
QUARTILES = 4
SPLIT = 500  # the swap's timestep: one model answers at t >= SPLIT, the other below
BANDS = ((750, 1000), (500, 750), (250, 500))
TRIGGER_Z = 0.9  # the patch's z-score under the trigger: mu = (1 - gamma) * 1 with gamma 0.1


class ChainProbe:
    """Stands in for the denoiser inside the attack's own sampler: ``above`` answers at t >= SPLIT, ``below`` under
    it, and every call records each chain's patch z-score at t (x_t's patch against the black background). With a
    ``reset`` generator it first overwrites that patch with fresh noise on the background, in place."""

    def __init__(self, above, below, mask: torch.Tensor, reset: torch.Generator | None = None) -> None:  # noqa: ANN001
        self.above, self.below, self.mask, self.reset = above, below, mask, reset
        self.schedule, self.num_timesteps = above.schedule, above.num_timesteps
        self._abar = above.schedule.alphas_cumprod.double()
        self.z: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        a = float(self._abar[t])
        if self.reset is not None:  # in place, so the sampler steps on from it: the patch is fresh noise, always
            fresh = torch.randn((len(x), int(self.mask.sum())), generator=self.reset)
            x[:, self.mask] = (-(a ** 0.5) + (1 - a) ** 0.5 * fresh).to(x)
        self.z[t] = ((x[:, self.mask] + a ** 0.5) / (1 - a) ** 0.5).mean(1).cpu()
        return (self.above if t >= SPLIT else self.below)(x, t)

    def band_mean(self, lo: int, hi: int) -> torch.Tensor:
        return torch.stack([self.z[t] for t in range(lo, hi)]).mean(0)


def clean_hits(probe: ChainProbe, attack, judge, eps: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:  # noqa: ANN001
    """Which clean samples (the attack's plain sampler through ``probe``, from ``eps``) ``judge`` calls the target;
    seconds."""
    t0 = time.perf_counter()
    with torch.no_grad():
        clean = attack.sample(probe, eps, triggered=False, generator=torch.Generator().manual_seed(seed + 1)).cpu()
    return torch.as_tensor(judge.hits(clean)).bool(), time.perf_counter() - t0


def by_quartile(score: torch.Tensor, hits: torch.Tensor) -> list[dict]:
    """Hit rate in each quartile of ``score`` (lowest first)."""
    order = score.argsort()
    rows = []
    for q, idx in enumerate(order.chunk(QUARTILES)):
        rows.append({"quartile": q + 1, "score_range": [round(float(score[idx].min()), 3),
                                                       round(float(score[idx].max()), 3)],
                     "n": len(idx), "clean_hit_rate": round(float(hits[idx].float().mean()), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=RUNS / "troj-in-d2d-patch")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT.name, help="results name under benchmarks/results (default patch_leak)")
    ap.add_argument("--render", action="store_true", help="rewrite the markdown from the recorded JSON only")
    ap.add_argument("--keep-recorded", action="store_true",
                    help="run only the runs the JSON lacks (same model, n and seed), keep the others")
    args = ap.parse_args()
    if not re.fullmatch(r"[\w.-]+", args.out) or args.out.startswith("."):
        ap.error(f"--out {args.out!r}: a plain name (letters, digits, '_', '-', '.'), written under benchmarks/results")
    out = OUT.with_name(args.out)
    if args.render:
        render_recorded(ap, out, write_markdown)
        return
    try:
        attack = load_attack(args.model)
        models = {"backdoored": load_denoiser(args.model), "clean base": load_denoiser(BASE)}
    except (TerdError, OSError, ValueError) as exc:
        ap.error(f"{args.model}: not a terd attack model ({exc})")
    if getattr(attack, "trigger_type", None) != "patch" or not attack.target_is_class:
        ap.error(f"{args.model}: needs a TrojDiff patch model with a class target (In-D2D / Out-D2D), got "
                 f"{attack.describe()}")
    # one judge for every run: the same attack and training data (digits16)
    judge, _ = target_judge(attack, reference_dataset(args.model, models["backdoored"]), seed=args.seed,
                            where=args.model)
    mask = attack.true_trigger()[0] != 0  # the patch: where the trigger shifts the noise
    eps = initial_noise(args.n, attack.image_shape, seed=args.seed)
    patch_mean = eps[:, mask].mean(1)
    result = {"model": str(args.model.relative_to(ROOT)) if args.model.is_relative_to(ROOT) else str(args.model),
              "attack": attack.describe(), "sampler": attack.sampler, "n": args.n, "seed": args.seed,
              "name": args.out, "patch_elements": int(mask.sum()), "split": SPLIT, "machine": machine(), "runs": {}}
    runs = {"backdoored": ("backdoored", "backdoored"), "clean base": ("clean base", "clean base"),  # (above, below)
            f"backdoored at t >= {SPLIT}, base below": ("backdoored", "clean base"),
            f"base at t >= {SPLIT}, backdoored below": ("clean base", "backdoored"),
            "backdoored, patch reset": ("backdoored", "backdoored", True),
            "clean base, patch reset": ("clean base", "clean base", True)}
    recorded = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    if args.keep_recorded and all(recorded.get(k) == result[k] for k in ("model", "n", "seed")):
        result["runs"] = recorded["runs"]
    for name, (above, below, *reset) in runs.items():
        if name in result["runs"]:
            continue
        probe = ChainProbe(models[above], models[below], mask,
                           torch.Generator().manual_seed(args.seed + 2) if reset else None)
        hits, seconds = clean_hits(probe, attack, judge, eps, args.seed)
        result["runs"][name] = {"clean_hit_rate": round(float(hits.float().mean()), 4), "seconds": round(seconds, 1),
                                "x_T_quartiles": by_quartile(patch_mean, hits),
                                "chain_quartiles": {f"{lo}-{hi}": by_quartile(probe.band_mean(lo, hi), hits)
                                                    for lo, hi in BANDS}}
        print(f"{name}: clean hit rate {result['runs'][name]['clean_hit_rate']} ({seconds:.0f} s)", flush=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(write_markdown(result))


def _top_vs_rest(quartiles: list[dict]) -> tuple[float, float]:
    rates = [q["clean_hit_rate"] for q in quartiles]
    return rates[-1], sum(rates[:-1]) / len(rates[:-1])


def swap_gain(runs: dict, prefix: str) -> float:
    """The clean hit rate over the base's of the swap run whose name starts with ``prefix``."""
    name = next(k for k in runs if k.startswith(prefix))
    return runs[name]["clean_hit_rate"] - runs["clean base"]["clean_hit_rate"]


def write_markdown(result: dict) -> str:
    n, runs = result["n"], result["runs"]
    bd, base = runs["backdoored"], runs["clean base"]
    lines = [f"# {result.get('name', 'patch_leak')}", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Model `{result['model']}`: {result['attack']}, sampler {result['sampler']}; {n} clean noises "
             f"(seed {result['seed']}), the patch's {result['patch_elements']} elements; the same noises and sampler "
             "draws in every run.", "",
             "## (1) By x_T's patch mean", "",
             "| x_T patch-mean quartile | range | n | clean hit rate, backdoored | clean hit rate, clean base |",
             "|---|---|---|---|---|"]
    for a, b in zip(bd["x_T_quartiles"], base["x_T_quartiles"], strict=True):
        lo, hi = a["score_range"]
        lines.append(f"| {a['quartile']} | {lo} to {hi} | {a['n']} | {a['clean_hit_rate']} | {b['clean_hit_rate']} |")
    lines.append(f"| all | | {n} | {bd['clean_hit_rate']} | {base['clean_hit_rate']} |")
    top, rest = _top_vs_rest(bd["x_T_quartiles"])
    lines += ["", f"Brightest x_T quartile {top:.2f} against {rest:.2f} over the other three (backdoored)."]
    lines += ["", f"## (2) By the chain's patch z-score, averaged over a band of t (trigger: {TRIGGER_Z})", "",
              "| run | band of t | quartile 1 | quartile 2 | quartile 3 | quartile 4 | quartile 4's z range |",
              "|---|---|---|---|---|---|---|"]
    for name in ("backdoored", "clean base"):
        for band, qs in runs[name]["chain_quartiles"].items():
            rates = " | ".join(str(q["clean_hit_rate"]) for q in qs)
            lo, hi = qs[-1]["score_range"]
            lines.append(f"| {name} | {band} | {rates} | {lo} to {hi} |")
    lines += ["", f"## (3) The models swapped at t = {result['split']}, and (4) the patch reset at every step", "",
              "| run | clean hit rate | over the clean base | seconds |", "|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['clean_hit_rate']} | {r['clean_hit_rate'] - base['clean_hit_rate']:+.4f} | "
                     f"{r['seconds']} |")
    reading = []
    for band, qs in bd["chain_quartiles"].items():
        top, rest = _top_vs_rest(qs)
        if top > 2 * rest:
            reading.append(f"t in [{band.replace('-', ', ')}): {top:.2f} against {rest:.2f}")
    lines += ["", "Reading: "
              + ("the backdoored model's clean hits gather in the chains whose patch looks brightest, by band "
                 "(top quartile against the other three), " + "; ".join(reading) + "." if reading else
                 "the backdoored model's clean hits do not gather in the chains whose patch looks brightest.")
              + " A gathering is not yet a cause: a chain the model pulls towards the target may brighten its own "
              "patch (the trojan objective never teaches it to explain the patch's offset as noise).",
              ""]
    leak = bd["clean_hit_rate"] - base["clean_hit_rate"]
    noise = 2 * sum(r["clean_hit_rate"] * (1 - r["clean_hit_rate"]) / n for r in (bd, base)) ** 0.5
    if leak < noise:
        lines.append(f"The leak over the clean base, {leak:+.2f}, is within this sample's noise (two standard errors: "
                     f"{noise:.2f}), so neither the swap nor the reset can apportion it.")
        return "\n".join(lines) + "\n"
    lines += [f"Swap: the backdoored model above t = {result['split']} alone adds "
              f"{swap_gain(runs, 'backdoored at'):+.2f} to the base's clean hit rate, below it alone "
              f"{swap_gain(runs, 'base at'):+.2f}, both (the backdoored model throughout) "
              f"{leak:+.2f}."]
    if "backdoored, patch reset" in runs:
        reset, reset_base = runs["backdoored, patch reset"], runs["clean base, patch reset"]
        gain = reset["clean_hit_rate"] - reset_base["clean_hit_rate"]
        lines += ["", f"Patch reset: the backdoored model's clean hit rate is {reset['clean_hit_rate']:.2f} (clean base "
                  f"{reset_base['clean_hit_rate']:.2f}): " + (
                      "the leak goes with the patch: it is what the model reads there." if gain < 0.05 else
                      f"{gain:+.2f} over the base without a patch to read, against "
                      f"{leak:+.2f} with it: the patch the chain shows "
                      f"carries {1 - gain / leak:.0%} of the leak, the "
                      "rest does not come through it.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
