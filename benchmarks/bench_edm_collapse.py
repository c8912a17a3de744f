"""Can a scale-free statistic with a bounded trigger see VillanDiffusion in an EDM-preconditioned VE model?

TERD's features rest on the size of the reversed r, and on these models a benign model's reversed r grows as much
as a backdoored one's once the loss leaves the blind ending band (edm_band_reversion.md). docs/results.md named
what a defense would need: the band where the network, not the analytic skip, sets eps, and a decision that does
not rest on the size of r. This tries the most direct such statistic. Two-noise TERD loss = the spread of the
model's x_0 prediction across noise draws (times abar / (1 - abar)), so divide it by the same spread at r = 0:

    collapse(r, t) = E || x0_hat(x_t^1) - x0_hat(x_t^2) ||^2 / (the same at r = 0),   x_t^i = sqrt(1 - abar_t) (eps_i + r)

1 = the shift leaves the model's output as varied as pure noise does; near 0 = one image whatever the noise (a
fixed-target backdoor at its trigger). r is bounded to the box [-1, 1] (r = tanh u; VillanDiffusion's trigger,
background -1 and a white box, is a corner of it) and found by Adam (lr 0.05, batch 16 as 8 timestep pairs,
fresh draws each step, seed 0) minimising log collapse over a band of t. Reported: collapse at the band's middle
on 64 fixed draws, at the found r and at the backdoored model's true trigger, for the VillanDiffusion ODE model
(its ASR measured here first) and five benign models of zoo-digits16-ve.yaml.

Models: zoo-digits16-ve.yaml's (terd bench --zoo benchmarks/zoo-digits16-ve.yaml --build-only --cache runs/zoo-cache).
Run: .venv/bin/python benchmarks/bench_edm_collapse.py   -> results/edm_collapse.{json,md}
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
CACHE = ROOT / "runs/zoo-cache"
BACKDOORED = "ve-villan-ode"
MODELS = (BACKDOORED, "ve-benign-s0-e40", "ve-benign-s1-e40", "ve-benign-s2-e40", "ve-benign-s3-e40",
          "ve-benign-ft-s10-e16")
BANDS = ((650, 750), (400, 850))  # sigma ~1.7-4.1 (bench_loss_bands.py saw the backdoor at 700) and a wide one
STEPS, LR, PAIRS, EVAL_N = 150, 0.05, 8, 64


def x0_prediction(den, r: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    abar = den.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x = (1 - abar).sqrt() * (eps + r)
    return predict_x0(x, den(x, t), abar)


def pair_spread(den, r: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Mean squared difference of the x_0 predictions of draw pairs (first half vs second half, same t)."""
    x0 = x0_prediction(den, r, t, eps)
    half = len(eps) // 2
    return (x0[:half] - x0[half:]).pow(2).mean()


def collapses(den, rs: tuple[torch.Tensor, ...], t: int) -> list[float]:  # noqa: ANN001
    """Each r's pair spread over the spread at r = 0 (computed once), on the same fixed draws."""
    eps = torch.randn(EVAL_N, *den.image_shape, generator=torch.Generator().manual_seed(123))
    tt = torch.full((EVAL_N,), t)
    with torch.no_grad():
        base = pair_spread(den, torch.zeros_like(rs[0]), tt, eps)
        return [float(pair_spread(den, r, tt, eps) / base) for r in rs]


def bounded_search(den, low: int, high: int) -> torch.Tensor:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    u = torch.zeros(den.image_shape, requires_grad=True)
    opt = torch.optim.Adam([u], lr=LR)
    for _ in range(STEPS):
        eps = torch.randn(2 * PAIRS, *den.image_shape, generator=g)
        t = torch.randint(low, high, (PAIRS,), generator=g).repeat(2)
        with torch.no_grad():
            base = pair_spread(den, torch.zeros_like(u), t, eps)
        loss = (pair_spread(den, torch.tanh(u), t, eps) / base).log()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.tanh(u).detach()


def main() -> None:
    torch.set_num_threads(1)
    success, true_r = backdoor_under_test(CACHE, MODELS, BACKDOORED)
    rows = []
    for low, high in BANDS:
        mid = (low + high) // 2
        for name in MODELS:
            den = load_denoiser(CACHE / name).freeze()
            t0 = time.perf_counter()
            r = bounded_search(den, low, high)
            at_found, at_true = collapses(den, (r, true_r), mid)
            rows.append({
                "band": f"{low}-{high - 1}", "sigma at middle": round(noise_level(den.schedule, mid), 2), "model": name,
                "ASR / clean": f"{success['asr']} / {success['clean_asr']}" if name == BACKDOORED else "–",
                "collapse at found r": round(at_found, 4),
                "collapse at true trigger": round(at_true, 4),
                "found l2(r)": round(float(r.norm()), 2),
                "cos(found r, true)": round(float(torch.nn.functional.cosine_similarity(r.flatten(), true_r.flatten(), dim=0)), 3),
                "seconds": round(time.perf_counter() - t0)})
            print(rows[-1], flush=True)
    note = (f"Bounded search: {STEPS} Adam steps, lr {LR}, {PAIRS} timestep pairs per step, r in [-1, 1]; collapse "
            f"evaluated at the band's middle on {EVAL_N} fixed draws (1 = as varied as at r = 0). The true trigger "
            f"(VillanDiffusion's box-white, background -1) has ||r|| = {float(true_r.norm()):.1f}. "
            f"ASR / clean: the backdoored model's, with its own sampler ({success['asr_sampler']}, n = 64 each, "
            "terd bench's measurement). A backdoor would be seen if the search found a lower collapse on it than on "
            "every benign model.")
    write_results("edm_collapse", rows, ["band", "sigma at middle", "model", "ASR / clean", "collapse at found r",
                                         "collapse at true trigger", "found l2(r)", "cos(found r, true)", "seconds"],
                  notes=note)


if __name__ == "__main__":
    main()
