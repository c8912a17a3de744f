"""The accessible reversed loss (TERD eq. "two-noise difference").

An attacker's training loss has terms that do not depend on the sampled noise (the trigger
shift, the target correction). Noising the SAME x_0 at the SAME t with two independent unit
noises and differencing the two residuals ``eps_i - eps_theta(x_t^i, t)`` cancels all of them,
so the loss needs no knowledge of the attack.

Generalisation used here: with K >= 2 noises per (x_0, t) the mean of the pairwise losses
0.5 * ||d_i - d_j||^2 equals the unbiased sample variance sum_i ||d_i - mean d||^2 / (K - 1). For
K = 2 it is exactly the paper's loss; larger K gives K(K-1)/2 pairs for K network evaluations,
which is how the ``fast`` preset gets more signal per evaluation.
"""

from __future__ import annotations

import torch

from terd.models.denoiser import Denoiser

ENDING = "ending"  # c = 1, t ~ U{T-10..T-1}
BEGINNING = "beginning"  # c = 0, t ~ U{0..9}
WINDOW = 10


def term_timesteps(term: str, num_timesteps: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps of one loss term: the last 10 ("ending") or the first 10 ("beginning")."""
    low = num_timesteps - WINDOW if term == ENDING else 0
    return torch.randint(low, low + WINDOW, (n,), generator=generator)


def noisy_inputs(
    x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, r: torch.Tensor, gamma: torch.Tensor, c: float, abars
) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + gamma sqrt(1 - abar_t) eps + c r  (the unified backdoored forward process).

    ``x0``: (..., B, C, H, W); ``t``: (B,); ``eps``: (K, B, C, H, W); a K axis is inserted before x_0's B
    axis, so (B, ...) gives (K, B, C, H, W) and M candidates' (M, B, ...) give (M, K, B, C, H, W); ``r``
    and ``gamma`` broadcast against the result.
    """
    a = abars.to(x0.device, x0.dtype)[t.to(x0.device)].view(-1, 1, 1, 1)
    return a.sqrt() * x0.unsqueeze(-5) + gamma * (1 - a).sqrt() * eps + c * r


def reversed_loss(
    den: Denoiser,
    r: torch.Tensor,
    gamma: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    c: float,
    eps: torch.Tensor,
) -> torch.Tensor:
    """Mean over x_0 of the mean pairwise 0.5 ||(eps_i - eps_theta(x_t^i)) - (eps_j - eps_theta(x_t^j))||^2.

    ``eps`` holds K >= 2 unit noises per x_0, shape (K, B, C, H, W); the regression target is the unit
    noise (not gamma * eps). Sum over pixels, mean over the batch. One network call on K*B images.
    """
    return reversed_losses(den, r.unsqueeze(0), gamma.unsqueeze(0), x0, t, c, eps)[0]


def reversed_losses(
    den: Denoiser,
    r: torch.Tensor,
    gamma: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    c: float,
    eps: torch.Tensor,
) -> torch.Tensor:
    """``reversed_loss`` of M candidates (r, gamma: (M, C, H, W)) on the same draws, in ONE network call.

    Why one call: a tiny model costs 1.7-2.4x more per image at batch 8 than at batch 64 on a 2-core CPU, and
    stacking cut a ``fast`` reversion's time by 15-16% (``benchmarks/bench_candidate_batching.py``).
    ``x0`` is shared, (B, C, H, W), or per candidate, (M, B, C, H, W). Returns (M,).
    """
    k, b = eps.shape[:2]
    if k < 2:
        raise ValueError("the reversed loss needs at least two noises per x_0")
    m = r.shape[0]
    x_t = noisy_inputs(x0, t, eps, r[:, None, None], gamma[:, None, None], c, den.schedule.alphas_cumprod)
    pred = den(x_t.reshape(m * k * b, *eps.shape[2:]), t.repeat(m * k).to(x0.device)).view_as(x_t)
    d = eps - pred  # (M, K, B, C, H, W)
    centred = d - d.mean(dim=1, keepdim=True)
    return centred.pow(2).sum(dim=(1, 3, 4, 5)).div(k - 1).mean(dim=1)
