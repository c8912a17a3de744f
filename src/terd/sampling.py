"""Samplers as plain functions over a :class:`~terd.models.Denoiser`.

Each takes the initial noise ``x_T`` explicitly (so backdoor inputs need no forked pipeline), works
on a batch, is seeded through an explicit ``torch.Generator``, and keeps the autograd graph whenever
the caller has gradients enabled (trigger refinement backpropagates through a 10-step DDIM).

The update rules follow diffusers' ``DDPMScheduler`` (variance "fixed_small") and ``DDIMScheduler``
("leading" timestep spacing, ``set_alpha_to_one``) so that both agree step by step; the tests check it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from terd.models.denoiser import Denoiser

StepCallback = Callable[[int, torch.Tensor], None]


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """The x_0 implied by a noise prediction: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Descending timesteps with diffusers' default "leading" spacing: [k*(T//steps) for k] reversed."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    stride = num_train_timesteps // steps
    return [k * stride for k in reversed(range(steps))]


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddpm_step(
    x: torch.Tensor, eps: torch.Tensor, t: int, schedule, *, noise: torch.Tensor | None, clip_sample: bool = False
) -> torch.Tensor:
    """x_{t-1} from x_t: posterior mean given the predicted x_0, plus sqrt(beta_tilde_t) * noise (t > 0)."""
    abars = schedule.alphas_cumprod.to(x.device)
    abar_t = abars[t]
    abar_prev = abars[t - 1] if t > 0 else torch.ones((), device=x.device)
    beta_t = 1 - abar_t / abar_prev  # diffusers' float32 form (not betas[t]): bitwise-close to its scheduler
    x0 = predict_x0(x, eps, abar_t)
    if clip_sample:
        x0 = x0.clamp(-1, 1)
    mean = abar_prev.sqrt() * beta_t / (1 - abar_t) * x0 + (1 - beta_t).sqrt() * (1 - abar_prev) / (1 - abar_t) * x
    if t == 0 or noise is None:
        return mean
    var = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=1e-20)
    return mean + var.sqrt() * noise


def ddim_step(
    x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int | None, schedule, *, eta: float = 0.0,
    noise: torch.Tensor | None = None, clip_sample: bool = False,
) -> torch.Tensor:
    """x_{t_prev} from x_t (t_prev None: to the clean image, abar = 1)."""
    abars = schedule.alphas_cumprod.to(x.device)
    abar_t = abars[t]
    abar_prev = abars[t_prev] if t_prev is not None else torch.ones((), device=x.device)
    x0 = predict_x0(x, eps, abar_t)
    if clip_sample:
        x0 = x0.clamp(-1, 1)  # like diffusers: the direction term keeps the unclipped eps
    std = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    out = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).sqrt() * eps
    return out + std * noise if eta > 0 and noise is not None else out


def ddpm_sample(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    clip_sample: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral DDPM over all T steps, variance beta_tilde ("fixed_small").

    ``clip_sample`` clamps the predicted x_0 to [-1, 1]; it is OFF by default because BadDiffusion-style
    backdoors only fire without it (the reference attacks sample unclipped).
    """
    x = x_T
    for t in reversed(range(denoiser.num_timesteps)):
        noise = _noise_like(x, generator) if t > 0 else None
        x = ddpm_step(x, denoiser(x, t), t, denoiser.schedule, noise=noise, clip_sample=clip_sample)
        if callback is not None:
            callback(t, x)
    return x


def ddim_sample(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    *,
    steps: int = 50,
    timesteps: Sequence[int] | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_sample: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM (eta = 0: the deterministic probability-flow discretisation; eta = 1: DDPM-like noise).

    ``timesteps`` (descending) overrides the default leading spacing, e.g. TrojDiff's quadratic one.
    The step after the last timestep goes to abar = 1 (a clean image).
    """
    ts = list(timesteps) if timesteps is not None else ddim_timesteps(denoiser.num_timesteps, steps)
    if any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError("DDIM timesteps must be strictly descending")
    x = x_T
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else None
        eps = denoiser(x, t)
        noise = _noise_like(x, generator) if eta > 0 else None
        x = ddim_step(x, eps, t, t_prev, denoiser.schedule, eta=eta, noise=noise, clip_sample=clip_sample)
        if callback is not None:
            callback(t, x)
    return x


def initial_noise(
    n: int, shape: Sequence[int], *, seed: int | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """n unit Gaussian initial noises x_T of the given C x H x W shape, reproducible from ``seed``."""
    g = torch.Generator(device="cpu")
    if seed is not None:
        g.manual_seed(seed)
    return torch.randn((n, *shape), generator=g).to(device)


def sample_images(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 64,
    clip_sample: bool = False,
) -> torch.Tensor:
    """Generate images from given initial noises in batches, without gradients; model scale ([-1, 1] data).

    The samples are returned as the sampler leaves them (not clamped unless ``clip_sample``): callers that
    measure them decide how out-of-range pixels count."""
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown sampler {sampler!r} (ddim or ddpm)")
    g = torch.Generator(device=x_T.device).manual_seed(seed)
    out = []
    with torch.no_grad():
        for chunk in x_T.split(batch_size):
            if sampler == "ddpm":
                out.append(ddpm_sample(denoiser, chunk, generator=g, clip_sample=clip_sample))
            else:
                out.append(ddim_sample(denoiser, chunk, steps=steps, generator=g, clip_sample=clip_sample))
    return torch.cat(out)
