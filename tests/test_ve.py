"""VE models (NCSN score networks and EDM-preconditioned ones): the schedules, the coordinate change in the
wrapper, saving/loading, and the attacks' closed forms, all against exact cases (point-mass oracles,
diffusers' own sigmas)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import EDMEulerScheduler, ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel
from torch import nn

from terd.attacks.villan import villan_coefficients
from terd.errors import TerdError
from terd.models import Denoiser, NoiseSchedule, load_denoiser, save_pipeline
from terd.presets import get_preset
from terd.sampling import ddim_sample, ddpm_sample
from terd.train import train

VE = NoiseSchedule.ve(0.01, 10.0, 1000)
EDM = NoiseSchedule.edm(0.02, 20.0, 0.5, "exponential", 1000)


class PointMassEDM(nn.Module):
    """The EDM network F whose denoiser D = c_skip x + c_out F is exactly the point mass y (any sigma)."""

    def __init__(self, y: torch.Tensor, sigma_data: float = 0.5, v_prediction: bool = False) -> None:
        super().__init__()
        self.register_buffer("y", y)
        self.sd, self.sign = sigma_data, -1.0 if v_prediction else 1.0
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> SimpleNamespace:
        sigma = torch.exp(4 * c_noise).view(-1, 1, 1, 1)
        norm = (sigma**2 + self.sd**2).sqrt()
        x = x_in * norm
        c_skip, c_out = self.sd**2 / norm**2, self.sign * sigma * self.sd / norm
        return SimpleNamespace(sample=(self.y - c_skip * x) / c_out)


class PointMassScore(nn.Module):
    """The exact score of y01 + sigma * eps in the network's own coordinates, answered like a diffusers UNet."""

    def __init__(self, y01: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("y01", y01)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.seen_sigmas: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> SimpleNamespace:
        self.seen_sigmas.append(sigma)
        return SimpleNamespace(sample=-(x - self.y01) / sigma.view(-1, 1, 1, 1) ** 2)


def test_ve_sigmas_are_diffusers_discrete_sigmas_and_abar_is_the_vp_equivalent():
    ref = ScoreSdeVeScheduler(num_train_timesteps=1000, sigma_min=0.01, sigma_max=10.0)
    ref.set_sigmas(1000)
    assert torch.allclose(VE.sigmas, ref.discrete_sigmas.float(), rtol=1e-5)
    assert torch.allclose(VE.alphas_cumprod, 1 / (1 + (2 * VE.sigmas) ** 2), rtol=1e-6)
    # betas reproduce abar through the usual cumulative product
    assert torch.allclose(torch.cumprod(1 - VE.betas.double(), 0).float(), VE.alphas_cumprod, rtol=1e-4)
    assert VE.kind == "ve" and NoiseSchedule.linear().kind == "vp"
    again = NoiseSchedule.from_config({"_class_name": "ScoreSdeVeScheduler", **VE.scheduler_config()})
    assert again.kind == "ve" and torch.equal(again.sigmas, VE.sigmas)


@pytest.mark.parametrize("bad", [(0.0, 10.0, 1000), (5.0, 1.0, 1000), (0.01, float("inf"), 1000), (0.01, 1.0, 1)])
def test_bad_ve_schedules_are_errors(bad):
    with pytest.raises(TerdError, match="VE schedule"):
        NoiseSchedule.ve(*bad)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_wrapper_turns_an_edm_network_into_the_unit_noise(prediction):
    sched = NoiseSchedule.edm(0.02, 20.0, 0.5, "karras", 1000, prediction_type=prediction)
    g = torch.Generator().manual_seed(5)
    y = torch.rand(1, 1, 4, 4, generator=g) * 2 - 1
    den = Denoiser(PointMassEDM(y, v_prediction=prediction == "v_prediction"), sched, (1, 4, 4))
    t = torch.tensor([0, 10, 500, 999])
    eps = torch.randn(4, 1, 4, 4, generator=g)
    x = sched.abar(t, eps).sqrt() * y + (1 - sched.abar(t, eps)).sqrt() * eps
    assert torch.allclose(den(x, t), eps, atol=2e-4)


def test_edm_schedule_matches_diffusers_sigmas_and_rejects_bad_settings():
    for kind in ("karras", "exponential"):
        ours = NoiseSchedule.edm(sigma_schedule=kind, num_timesteps=1001)
        ref = EDMEulerScheduler(sigma_schedule=kind, num_train_timesteps=1000)
        assert torch.allclose(ours.sigmas.flip(0), ref.sigmas[:-1], rtol=1e-5)
    assert EDM.parameterization == "edm" and EDM.pixel_scale == 1.0 and VE.pixel_scale == 2.0
    assert torch.allclose(EDM.alphas_cumprod, 1 / (1 + EDM.sigmas**2), rtol=1e-6)
    again = NoiseSchedule.from_config({"_class_name": "EDMEulerScheduler", **EDM.scheduler_config()})
    assert torch.equal(again.sigmas, EDM.sigmas) and again.config == EDM.config
    for bad, msg in [({"sigma_schedule": "linear"}, "sigma_schedule"), ({"prediction_type": "sample"}, "prediction"),
                     ({"sigma_data": 0.0}, "sigma_data"), ({"sigma_min": 3.0, "sigma_max": 1.0}, "sigma_min")]:
        with pytest.raises(TerdError, match=msg):
            NoiseSchedule.from_config({"_class_name": "EDMEulerScheduler", **bad})


def test_wrapper_turns_the_score_into_the_unit_noise_in_terd_coordinates():
    """x = sqrt(abar)(y + 2 sigma eps) in [-1, 1] pixels: the wrapper must answer exactly that eps, and feed the
    network y01 + sigma eps at sigma."""
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 1, 4, 4, generator=g) * 2 - 1
    net = PointMassScore((y + 1) / 2)
    den = Denoiser(net, VE, (1, 4, 4))
    t = torch.tensor([0, 10, 500, 999])
    eps = torch.randn(4, 1, 4, 4, generator=g)
    x = VE.abar(t, eps).sqrt() * y + (1 - VE.abar(t, eps)).sqrt() * eps
    assert torch.allclose(den(x, t), eps, atol=2e-4)
    assert torch.allclose(net.seen_sigmas[-1], VE.sigmas[t])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("family", ["score", "edm"])
def test_samplers_reach_the_point_mass_on_a_ve_model(sampler, family):
    y = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    den = Denoiser(PointMassScore((y + 1) / 2), VE, (1, 4, 4)) if family == "score" else \
        Denoiser(PointMassEDM(y), EDM, (1, 4, 4))
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ddpm_sample(den, x_T, generator=torch.Generator().manual_seed(2)) if sampler == "ddpm" \
            else ddim_sample(den, x_T, steps=10)
    assert torch.allclose(out, y.expand_as(out), atol=1e-3)


def test_ddim_on_a_ve_model_is_euler_in_sigma():
    """DDIM in VP coordinates is the Euler step of the probability-flow ODE dx/dsigma = eps in VE ones."""
    y = torch.zeros(1, 1, 4, 4)
    den = Denoiser(PointMassScore((y + 1) / 2), VE, (1, 4, 4))
    x_vp = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    t, t_prev = 700, 600
    with torch.no_grad():
        out = ddim_sample(den, x_vp, timesteps=[t, t_prev])  # two steps; check the first one alone below
        eps = den(x_vp, t)
    s, s_prev = 2 * VE.sigmas[t], 2 * VE.sigmas[t_prev]
    x_ve = x_vp / VE.alphas_cumprod[t].sqrt()
    euler = x_ve + (s_prev - s) * eps
    from terd.sampling import ddim_step

    step = ddim_step(x_vp, eps, t, t_prev, VE)
    assert torch.allclose(step / VE.alphas_cumprod[t_prev].sqrt(), euler, atol=1e-4)
    assert out.shape == x_vp.shape


@pytest.mark.parametrize("sched", [NoiseSchedule.linear(), VE, EDM], ids=["vp", "ve", "edm"])
@pytest.mark.parametrize("psi", [0.0, 0.5, 1.0])
def test_villan_sde_correction_carries_the_trigger_to_the_target(sched, psi):
    """With the exact poisoned noise predictor (point mass y, trigger share s_t r), ancestral DDPM from the
    poisoned marginal at T lands on y exactly: kappa_t moves s_t r to s_{t-1} r at every step."""
    s, kappa = villan_coefficients(sched, psi, "sde")
    g = torch.Generator().manual_seed(4)
    y = torch.rand(1, 1, 4, 4, generator=g) * 2 - 1
    r = torch.randn(1, 1, 4, 4, generator=g)
    abars = sched.alphas_cumprod

    class Poisoned:  # in terd's (VP) coordinates for both schedules: the sampler only calls it
        schedule, num_timesteps = sched, sched.num_timesteps

        def __call__(self, x, t):  # noqa: ANN001, ANN204
            a, st, k = abars[t], s[t], kappa[t]
            return (x - a.sqrt() * y - st * r) / (1 - a).sqrt() + k * r

    den = Poisoned()
    eps = torch.randn(2, 1, 4, 4, generator=g)
    T = sched.num_timesteps - 1
    x_T = abars[T].sqrt() * y + (1 - abars[T]).sqrt() * eps + s[T] * r
    with torch.no_grad():
        out = ddpm_sample(den, x_T, generator=g)
    assert torch.allclose(out, y.expand_as(out), atol=2e-3)


def test_villan_psi0_on_ve_is_the_papers_ve_attack():
    s, kappa = villan_coefficients(VE, 0.0, "sde")
    sig = VE.sigmas.double()
    assert torch.allclose(kappa[1:].double(), sig[1:] / (sig[1:] + sig[:-1]), atol=1e-4)
    assert abs(kappa[0].item() - 1.0) < 1e-4
    # the trigger share in VE coordinates is sigma_t r: x_ve = y + 2 sigma (eps + r) in [-1, 1] pixels
    assert torch.allclose(s / VE.alphas_cumprod.sqrt(), 2 * VE.sigmas, rtol=1e-4)
    _, k_ode = villan_coefficients(VE, 0.0, "ode")
    assert torch.allclose(k_ode, 2 * kappa)


def _tiny_score_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       time_embedding_type="fourier").eval()


def test_ve_pipeline_round_trip_and_stock_diffusers_loads_it(tmp_path):
    unet = _tiny_score_unet()
    sched = NoiseSchedule.ve(0.01, 5.0, 100)
    save_pipeline(unet, sched, tmp_path / "ve")
    den = load_denoiser(tmp_path / "ve")
    assert den.schedule.kind == "ve" and den.num_timesteps == 100
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = Denoiser(unet, sched, (1, 8, 8))(x, 50)
        assert torch.allclose(den(x, 50), ref, atol=1e-5)
    pipe = ScoreSdeVePipeline.from_pretrained(tmp_path / "ve")
    assert isinstance(pipe.scheduler, ScoreSdeVeScheduler) and pipe.scheduler.config.sigma_max == 5.0


def test_edm_pipeline_round_trip_and_stock_diffusers_loads_its_parts(tiny_unet, tmp_path):
    sched = NoiseSchedule.edm(0.02, 20.0, 0.5, "exponential", 100)
    save_pipeline(tiny_unet, sched, tmp_path / "edm")
    den = load_denoiser(tmp_path / "edm")
    assert den.schedule.parameterization == "edm" and den.schedule.config == sched.config
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(den(x, 50), Denoiser(tiny_unet, sched, (1, 8, 8))(x, 50), atol=1e-5)
    stock = EDMEulerScheduler.from_pretrained(tmp_path / "edm", subfolder="scheduler")
    assert stock.config.sigma_schedule == "exponential" and stock.config.sigma_max == 20.0
    UNet2DModel.from_pretrained(tmp_path / "edm", subfolder="unet")


def test_ve_scheduler_with_the_wrong_network_is_a_one_line_error(tiny_unet, tmp_path):
    save_pipeline(_tiny_score_unet(), NoiseSchedule.ve(0.01, 5.0, 100), tmp_path / "ve")
    tiny_unet.save_pretrained(tmp_path / "ve" / "unet", safe_serialization=True)  # a positional-embedding eps net
    with pytest.raises(TerdError, match="fourier"):
        load_denoiser(tmp_path / "ve")
    save_pipeline(tiny_unet, NoiseSchedule.edm(0.02, 20.0, 0.5, "exponential", 100), tmp_path / "edm")
    _tiny_score_unet().save_pretrained(tmp_path / "edm" / "unet", safe_serialization=True)
    with pytest.raises(TerdError, match="fourier"):
        load_denoiser(tmp_path / "edm")


def test_training_a_ve_preset_writes_a_ve_pipeline(tmp_path):
    """One short epoch of the VE preset on a handful of digits: the loss is finite and the model reloads as VE."""
    from dataclasses import replace

    from terd.data import ImageDataset, load_dataset

    preset = replace(get_preset("tiny-digits16-ve"), batch_size=16)
    ds = load_dataset("digits16")
    small = ImageDataset(ds.images[:32], ds.labels[:32], ds.name)
    res = train(preset, small, tmp_path / "m", epochs=1, grid_size=0, progress=False)
    assert res.final_loss == res.final_loss and res.final_loss < 10
    den = load_denoiser(tmp_path / "m")
    assert den.schedule.kind == "ve" and den.schedule.parameterization == "edm"


def test_info_and_sample_commands_on_a_ve_model(tiny_unet, tmp_path):
    """What a user sees: `terd info` names the schedule and parameterisation; `terd sample` runs; a bad EDM
    config is a one-line error."""
    import json

    from test_cli_foundation import terd

    save_pipeline(tiny_unet, NoiseSchedule.edm(0.02, 20.0, 0.5, "exponential", 50), tmp_path / "edm")
    res = terd("info", tmp_path / "edm")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["schedule"] == "ve" and info["parameterization"] == "edm" and info["sigma_max"] == 20.0
    res = terd("sample", tmp_path / "edm", "--out", tmp_path / "g.png", "--n", "2", "--steps", "5")
    assert res.returncode == 0 and (tmp_path / "g.png").is_file(), res.stderr
    cfg_file = tmp_path / "edm" / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "sigma_schedule": "cosine"}))
    res = terd("info", tmp_path / "edm")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "sigma_schedule" in res.stderr
