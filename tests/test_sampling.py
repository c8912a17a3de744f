"""Samplers: step-by-step equality with stock diffusers schedulers, and closed-form oracle checks."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conftest import GaussianOracle, PointMassOracle, oracle_denoiser
from terd.models import Denoiser, NoiseSchedule
from terd.sampling import ddim_sample, ddim_timesteps, ddpm_sample, ddpm_step, predict_x0


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_matches_diffusers_step_by_step(tiny_unet, clip):
    """Every one of the 1000 steps: from diffusers' x_t, our x_{t-1} equals DDPMScheduler.step's."""
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=clip)
    schedule = NoiseSchedule.from_config(dict(sched.config))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sched.set_timesteps(1000)
    g = torch.Generator().manual_seed(7)
    worst = 0.0
    with torch.no_grad():
        for t in sched.timesteps:
            eps = tiny_unet(x, t).sample
            noise = torch.randn(x.shape, generator=g.clone_state()) if t > 0 else None
            ours = ddpm_step(x, eps, int(t), schedule, noise=noise, clip_sample=clip)
            x = sched.step(eps, t, x, generator=g).prev_sample
            # a random network drives x far from [-1, 1]; compare relative to the magnitude in play
            worst = max(worst, (ours - x).abs().max().item() / (1 + x.abs().max().item()))
    assert worst < 1e-5


def test_ddpm_sample_draws_noise_like_diffusers(tiny_unet):
    """The full chain with one generator equals diffusers' loop for the first steps (same noise stream)."""
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    den = Denoiser(tiny_unet, NoiseSchedule.from_config(dict(sched.config)), (1, 8, 8))
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = []
    with torch.no_grad():
        ddpm_sample(den, x_T, generator=torch.Generator().manual_seed(7), callback=lambda t, x: ours.append(x))
        sched.set_timesteps(1000)
        g, x = torch.Generator().manual_seed(7), x_T.clone()
        for i, t in enumerate(sched.timesteps[:20]):
            x = sched.step(tiny_unet(x, t).sample, t, x, generator=g).prev_sample
            assert (ours[i] - x).abs().max() / (1 + x.abs().max()) < 1e-5


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.5, False), (0.0, True)])
def test_ddim_matches_diffusers_step_by_step(tiny_unet, beta_schedule, eta, clip):
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, clip_sample=clip)
    den = Denoiser(tiny_unet, NoiseSchedule.from_config(dict(sched.config)), (1, 8, 8))
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ours, theirs = [], []
    with torch.no_grad():
        ddim_sample(den, x_T, steps=20, eta=eta, generator=torch.Generator().manual_seed(3), clip_sample=clip,
                    callback=lambda t, x: ours.append(x.clone()))
        sched.set_timesteps(20)
        assert [int(t) for t in sched.timesteps] == ddim_timesteps(1000, 20)
        g = torch.Generator().manual_seed(3)
        x = x_T.clone()
        for t in sched.timesteps:
            x = sched.step(tiny_unet(x, t).sample, t, x, eta=eta, generator=g).prev_sample
            theirs.append(x.clone())
    err = max((a - b).abs().max().item() / (1 + b.abs().max().item()) for a, b in zip(ours, theirs, strict=True))
    assert err < 1e-5


def test_schedules_read_from_config_match_diffusers():
    for name in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
        ref = DDPMScheduler(beta_schedule=name)
        ours = NoiseSchedule.from_config(dict(ref.config))
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


def test_ddim_point_mass_oracle_closed_form(schedule):
    """Exact eps for a single data point: DDIM keeps eps constant, so every x_t is known in closed form."""
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    den = oracle_denoiser(PointMassOracle(x0, schedule), schedule, (3, 4, 4))
    x_T = torch.randn(5, 3, 4, 4, dtype=torch.float32)
    a = schedule.alphas_cumprod
    ts = ddim_timesteps(1000, 10)
    e0 = (x_T - a[ts[0]].sqrt() * x0) / (1 - a[ts[0]]).sqrt()
    seen = []
    out = ddim_sample(den, x_T, steps=10, callback=lambda t, x: seen.append(x))
    for t_next, x in zip(ts[1:], seen, strict=False):
        expect = a[t_next].sqrt() * x0 + (1 - a[t_next]).sqrt() * e0
        assert torch.allclose(x, expect, atol=1e-4)
    assert torch.allclose(out, x0.expand_as(out), atol=1e-4)


def test_ddpm_point_mass_oracle_reaches_the_point(schedule):
    x0 = torch.rand(1, 1, 4, 4) * 2 - 1
    den = oracle_denoiser(PointMassOracle(x0, schedule), schedule, (1, 4, 4))
    out = ddpm_sample(den, torch.randn(4, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0.expand_as(out), atol=1e-3)


def test_ddpm_gaussian_oracle_recovers_data_distribution(schedule):
    """With the exact score of N(m, s^2), ancestral sampling reproduces mean m and std s."""
    m, s = 0.3, 0.5
    den = oracle_denoiser(GaussianOracle(torch.full((1, 1, 1, 1), m), s, schedule), schedule, (1, 4, 4))
    out = ddpm_sample(den, torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
                      generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - m) < 0.01
    assert abs(out.std().item() - s) < 0.01


def test_ddim_keeps_autograd_graph(schedule):
    x0 = torch.zeros(1, 1, 4, 4)
    den = oracle_denoiser(GaussianOracle(x0, 0.5, schedule), schedule, (1, 4, 4))
    r = torch.zeros(1, 1, 4, 4, requires_grad=True)
    out = ddim_sample(den, torch.randn(2, 1, 4, 4) + r, steps=10)
    out.sum().backward()
    assert r.grad is not None and torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0


def test_predict_x0_inverts_forward_noising(schedule):
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    a = schedule.alphas_cumprod[500]
    assert torch.allclose(predict_x0(a.sqrt() * x0 + (1 - a).sqrt() * eps, eps, a), x0, atol=1e-5)


def test_ddim_rejects_bad_timesteps(schedule):
    den = oracle_denoiser(PointMassOracle(torch.zeros(1, 1, 2, 2), schedule), schedule, (1, 2, 2))
    with pytest.raises(ValueError):
        ddim_sample(den, torch.randn(1, 1, 2, 2), timesteps=[10, 20])
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)
