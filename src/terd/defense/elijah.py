"""Elijah (An et al., AAAI 2024), the baseline TERD is compared with, implemented from its paper.

Inversion: a backdoored model maps a triggered noise at t = T-1 to eps plus a fixed fraction of the
trigger (BadDiffusion: about 0.5), so the trigger is found as

    tau* = argmin_tau || mean_eps eps_theta(eps + tau, T-1) - lam * tau ||_1,   lam = 0.5

(100 Adam steps, lr 0.1, tau initialised to -U[0, 1)). Detection: images generated from eps + tau*
collapse onto the backdoor target, so their *uniformity* is high. We score a model by the mean
per-pixel standard deviation across the generated images (low spread = uniform = suspicious) and flag
it when the spread falls below a benign-only threshold (mean - 3 std over benign reference models),
the same honest protocol as TERD's thresholds.

Elijah only models a shift of the noise (no gamma), so attacks that also rescale it (TrojDiff,
gamma = 0.6) are outside its assumptions — the TERD paper reports TPR 0 there.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from terd.models.denoiser import Denoiser
from terd.sampling import sample_images


@dataclass
class ElijahResult:
    tau: torch.Tensor  # C x H x W, the inverted trigger in unit-noise space
    spread: float  # mean per-pixel std of images generated from eps + tau (low = uniform = backdoor-like)
    clean_spread: float  # the same for plain noise, for reference
    network_evaluations: int
    seconds: float
    loss: float


def invert_trigger(
    den: Denoiser, *, steps: int = 100, lr: float = 0.1, lam: float = 0.5, batch: int = 16, seed: int = 0,
) -> tuple[torch.Tensor, float, int]:
    """tau* = argmin || mean_eps eps_theta(eps + tau, T-1) - lam * tau ||_1; returns (tau, loss, evaluations)."""
    den.freeze()
    g = torch.Generator().manual_seed(seed)
    dev = den.device
    tau = (-torch.rand(den.image_shape, generator=g)).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([tau], lr=lr)
    t_last = den.num_timesteps - 1
    loss_value = float("nan")
    for _ in range(steps):
        eps = torch.randn((batch, *den.image_shape), generator=g).to(dev)
        mean_pred = den(eps + tau, t_last).mean(0)
        loss = (mean_pred - lam * tau).abs().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
    return tau.detach().cpu(), loss_value, steps * batch


def generation_spread(images: torch.Tensor) -> float:
    """Mean over pixels of the std across images: 0 when every image is the same (a fired backdoor).

    Measured on the images as images, clamped to [-1, 1]: an inverted trigger that drives a benign model's
    samples far out of range would otherwise give spreads of 2-6 (measured on tiny models) and a heavy-tailed
    benign distribution whose mean - 3 std threshold is negative, so nothing could ever be flagged.
    """
    return float(images.float().clamp(-1, 1).std(dim=0).mean())


def elijah_scan(
    den: Denoiser, *, n_images: int = 16, seed: int = 0, sampler: str = "ddpm", steps: int = 100, lr: float = 0.1,
) -> ElijahResult:
    """Invert a trigger and measure the uniformity of what it generates (and of clean generations)."""
    t0 = time.perf_counter()
    tau, loss, evals = invert_trigger(den, steps=steps, lr=lr, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    eps = torch.randn((n_images, *den.image_shape), generator=g).to(den.device)
    triggered = sample_images(den, eps + tau.to(den.device), sampler=sampler, seed=seed)
    clean = sample_images(den, eps, sampler=sampler, seed=seed)
    gen_evals = 2 * n_images * (den.num_timesteps if sampler == "ddpm" else 50)
    return ElijahResult(tau, generation_spread(triggered), generation_spread(clean), evals + gen_evals,
                        time.perf_counter() - t0, loss)


def fit_spread_threshold(benign_spreads: list[float], k: float = 3.0) -> float:
    """Benign-only rule: flag a model whose triggered spread is below mean - k std of benign models."""
    if len(benign_spreads) < 2:
        raise ValueError("need at least 2 benign models to fit a threshold")
    return statistics.fmean(benign_spreads) - k * statistics.stdev(benign_spreads)


def is_backdoored(result: ElijahResult, threshold: float) -> bool:
    return result.spread < threshold
