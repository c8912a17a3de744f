"""What stacking the reversion's candidates into one network call buys on this CPU.

The ``fast`` preset reverses two candidates (reference start, line-search start). terd used to give each candidate
its own network calls: batch 32 (8 x_0 x 4 noises) for a loss term and batch 8 for each differentiable DDIM
step. Now every call carries all candidates' images (64 and 16), and the line search evaluates all 8 radii of a
gamma at once. Same images, same draws, so the same trigger up to float rounding.

The old call pattern is reproduced by splitting each call back into per-candidate chunks (32 images, or 8 when
32 does not divide the call), so both patterns run the same code and are timed in one run, interleaved.
Rows: ms per image of one forward + input-backward pass by batch size; then the demo models' ``fast`` reversion
(seed 0) in both patterns: seconds (median of the repeats), network calls, the largest difference of the reversed
r and gamma, and the KL features.
Run: .venv/bin/python benchmarks/bench_candidate_batching.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_results  # noqa: E402

from terd.defense.reversion import get_config, reverse_trigger  # noqa: E402
from terd.demo import asset_model  # noqa: E402
from terd.models import load_denoiser  # noqa: E402

MODELS = ("demo-benign", "demo-trojdiff")
BATCHES = (8, 16, 32, 64, 128)


def count_calls(den, chunk_sizes: tuple[int, ...] | None = None) -> list[int]:  # noqa: ANN001
    """Count the network calls ``den`` really makes; with ``chunk_sizes`` it answers each call in chunks of the
    first size that divides it (the per-candidate pattern). Returns a one-item list holding the count."""
    whole, made = den._call, [0]

    def call(network, x, t):  # noqa: ANN001, ANN202
        size = next((c for c in chunk_sizes or () if x.shape[0] % c == 0), x.shape[0])
        ts = t.expand(x.shape[0]) if t.dim() == 0 else t
        outs = []
        for i in range(0, x.shape[0], size):
            made[0] += 1
            outs.append(whole(network, x[i:i + size], ts[i:i + size]))
        return torch.cat(outs)

    den._call = call
    return made


def per_image_ms(den, batch: int) -> float:  # noqa: ANN001
    x = torch.randn(batch, *den.image_shape, requires_grad=True)
    t = torch.full((batch,), 500)

    def step() -> None:
        with torch.enable_grad():
            torch.autograd.grad(den(x, t).pow(2).sum(), x)

    return 1000 * median_seconds(step, repeats=15, warmup=3) / batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = replace(get_config("fast"), patch_probe=False)  # the probe makes no stacked calls
    per_candidate = (cfg.batch_size * cfg.noises_per_x0, cfg.batch_size)
    rows = []
    den = load_denoiser(asset_model(MODELS[0])).freeze()
    for b in BATCHES:
        rows.append({"what": f"forward + input-backward, batch {b}", "ms_per_image": round(per_image_ms(den, b), 3)})
        print(rows[-1], flush=True)
    for name in MODELS:
        seconds: dict[str, list[float]] = {"per-candidate": [], "stacked": []}
        results = {}
        for _ in range(args.repeats):
            for pattern in seconds:  # interleaved, so machine-load drift hits both alike
                den = load_denoiser(asset_model(name))
                made = count_calls(den, per_candidate if pattern == "per-candidate" else None)
                t0 = time.perf_counter()
                res = reverse_trigger(den, cfg, seed=0)
                seconds[pattern].append(time.perf_counter() - t0)
                results[pattern] = res, made[0]
        (old, _), (new, _) = results["per-candidate"], results["stacked"]
        dr = max(float((a.r - b.r).abs().max()) for a, b in zip(old.candidate_triggers, new.candidate_triggers,
                                                                 strict=True))
        dg = max(float((a.gamma - b.gamma).abs().max()) for a, b in zip(old.candidate_triggers,
                                                                        new.candidate_triggers, strict=True))
        med = {k: statistics.median(v) for k, v in seconds.items()}
        for pattern, (res, made) in results.items():
            rows.append({"what": f"{name}: fast reversion, {pattern} calls", "seconds": round(med[pattern], 1),
                         "network_evaluations": res.network_evaluations, "network_calls": made,
                         "M_r": round(res.features["M_r"], 5), "V_r": round(res.features["V_r"], 6)})
            print(rows[-1], flush=True)
        rows.append({"what": f"{name}: stacked / per-candidate", "seconds": round(med["stacked"] / med["per-candidate"], 3),
                     "max_abs_diff_r": f"{dr:.2e}", "max_abs_diff_gamma": f"{dg:.2e}"})
        print(rows[-1], flush=True)
    write_results("candidate_batching", rows, ["what", "ms_per_image", "seconds", "network_evaluations",
                                               "network_calls", "M_r", "V_r", "max_abs_diff_r", "max_abs_diff_gamma"],
                  notes=(f"Preset fast (2 candidates, batch {cfg.batch_size}, {cfg.noises_per_x0} noises per x_0, "
                         f"{cfg.ddim_steps} DDIM steps), seed 0, 2 threads, {args.repeats} interleaved repeats per "
                         "pattern (median seconds). per-candidate = each call split back into one candidate's "
                         f"chunks ({per_candidate[0]} images per loss call, {per_candidate[1]} per DDIM step), the "
                         "pattern before stacking; stacked = one call for all candidates. The patch probe is not "
                         "part of these timings."))


if __name__ == "__main__":
    main()
