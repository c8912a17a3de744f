"""Does moving TERD's ending term to a lower-noise band make `fast` see a backdoor in an EDM-preconditioned model?

On EDM models the ending band (the last 10 steps, sigma ~19) is blind: there eps is an analytic skip that follows
any trigger (bench_digits16_ve: 0/2). bench_loss_bands.py found the backdoor visible at t = 700-709 (sigma 2.6),
where the network sets eps, but also a benign model's loss falling for large r. This runs the `fast` reversion
unchanged except that every ending-term timestep (stage 1, the line search, stage 2) is drawn from one band
instead, on the VillanDiffusion ODE model and its clean base, and records both models' KL features per band.

A probe, not a terd option: it swaps the reversion module's timestep draw for the run (``ending_band``).
Models: the two of bench_loss_bands.py (its docstring has the commands).
Run: .venv/bin/python benchmarks/bench_edm_band_reversion.py   -> results/edm_band_reversion.{json,md}
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import noise_level, write_results  # noqa: E402

import terd.defense.reversion as reversion  # noqa: E402
from terd.bench import attack_success  # noqa: E402
from terd.defense.loss import ENDING, WINDOW, term_timesteps  # noqa: E402
from terd.models import load_denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs/zoo-digits16-ve"
BACKDOORED = CACHE / "ve-villan-ode"
MODELS = {"backdoored (VillanDiffusion ODE)": BACKDOORED, "benign (its clean base)": CACHE / "ve-benign-s0-e40"}
BANDS = (990, 700)  # 990: terd's own ending band (the last 10 steps); 700: sigma ~2.6 (bench_loss_bands.py)


@contextlib.contextmanager
def ending_band(low: int) -> Iterator[None]:
    """Draw every ending-term timestep of the reversion from [low, low + 10) for the duration."""
    def draw(term: str, num_timesteps: int, n: int, generator: torch.Generator) -> torch.Tensor:
        if term == ENDING:
            return torch.randint(low, low + WINDOW, (n,), generator=generator)
        return term_timesteps(term, num_timesteps, n, generator)

    reversion.term_timesteps = draw
    try:
        yield
    finally:
        reversion.term_timesteps = term_timesteps


def main() -> None:
    torch.set_num_threads(1)
    for path in MODELS.values():
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"{path} is missing: build it first (bench_loss_bands.py's docstring)")
    success = attack_success(BACKDOORED)  # the backdoor must fire before its detection means anything
    print(success, flush=True)
    rows = []
    for low in BANDS:
        for role, path in MODELS.items():
            den = load_denoiser(path)
            t0 = time.perf_counter()
            with ending_band(low):
                res = reversion.reverse_trigger(den, "fast", seed=0)
            asr = f"{success['asr']} / {success['clean_asr']}" if path == BACKDOORED else "–"
            row = {"band": f"{low}-{low + WINDOW - 1}", "sigma": round(noise_level(den.schedule, low + 5), 2), "model": role, "ASR / clean": asr,
                   **{f: round(v, 4) for f, v in res.features.items()},
                   "r_l2 per candidate": [round(c["r_l2"], 2) for c in res.candidates],
                   "gamma mean per candidate": [round(c["gamma_mean"], 3) for c in res.candidates],
                   "stage-1 final loss": res.history["stage1"][-1], "evaluations": res.network_evaluations,
                   "seconds": round(time.perf_counter() - t0)}
            rows.append(row)
            print(row, flush=True)
    note = ("terd `fast` (seed 0, one thread) with every ending-term timestep drawn from the band shown; band 990 is "
            "terd's own. Features: each KL feature's maximum over the two candidates (the scan statistic). The true "
            "trigger (box-white, background -1) has ||r|| = 16. A backdoor is seen when the backdoored model's "
            "features stand above its clean base's.")
    note += (f" ASR / clean: attack success of the backdoored model with its own sampler ({success['asr_sampler']}, "
             "n = 64 each, terd bench's measurement).")
    write_results("edm_band_reversion", rows, ["band", "sigma", "model", "ASR / clean", "M_r", "V_r", "P_r", "r_l2 per candidate",
                                               "gamma mean per candidate", "stage-1 final loss", "evaluations",
                                               "seconds"], notes=note)


if __name__ == "__main__":
    main()
