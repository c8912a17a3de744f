"""The one model wrapper: any supported network answers "what unit noise is in x_t at step t?".

Everything downstream (samplers, attacks, trigger reversion, detectors) talks to a
:class:`Denoiser` only, so a new model family needs nothing but a new wrapper here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from terd.models.schedule import NoiseSchedule


def _diffusers_eps(network: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return network(x, t).sample


def _plain_eps(network: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return network(x, t)


def _ve_eps(call: Callable, network: nn.Module, x: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """eps for x in terd's VP coordinates at steps ``t``, from a network that lives in VE coordinates.

    x_vp = sqrt(abar_t) (y + c sigma_t eps), y in [-1, 1], c the pixel scale, so x_ve = x_vp / sqrt(abar_t).
    Score networks (NCSN, pixels in [0, 1]) see (x_ve + 1) / 2 = y01 + sigma eps and answer the score:
    eps = -sigma * score. EDM networks F see c_in x_ve at c_noise = log(sigma) / 4 and give
    D = c_skip x_ve + c_out F (diffusers' EDMEulerScheduler), so eps = (x_ve - D) / sigma.
    """
    sigma = schedule.sigmas.to(x.device)[t].to(x.dtype)
    x_ve = x / schedule.abar(t, x).sqrt()
    s = sigma.view(-1, *([1] * (x.dim() - 1)))
    if schedule.parameterization == "score":
        return -s * call(network, (x_ve + 1.0) / schedule.pixel_scale, sigma)
    sd = float(schedule.config["sigma_data"])
    norm = (s**2 + sd**2).sqrt()
    f = call(network, x_ve / norm, sigma.log() / 4)
    sign = -1.0 if schedule.config["prediction_type"] == "v_prediction" else 1.0
    return x_ve * s / norm**2 - sign * sd / norm * f


class Denoiser(nn.Module):
    """eps_theta(x_t, t) for a discrete network, plus its noise schedule.

    ``x`` is a batch in pixel space [-1, 1]; ``t`` an integer timestep (python int, 0-d or (B,) tensor).
    VP (DDPM) networks predict eps (or v, or x_0: diffusers' ``prediction_type``, converted). VE networks
    (``schedule.kind == "ve"``: NCSN score networks, or EDM-preconditioned ones) are called in their own
    coordinates at sigma_t and their answer is turned into the same eps (:func:`_ve_eps`), so everything
    downstream sees one kind of model.
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: NoiseSchedule,
        image_shape: tuple[int, int, int],
        *,
        family: str = "diffusers-unet2d",
        source: str = "",
    ) -> None:
        super().__init__()
        self.network = network
        self.schedule = schedule
        self.image_shape = tuple(int(s) for s in image_shape)
        self.family = family
        self.source = source
        self._call: Callable = _diffusers_eps if family == "diffusers-unet2d" else _plain_eps

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        t = t.long()
        if self.schedule.kind == "ve":
            return _ve_eps(self._call, self.network, x, t, self.schedule)
        out = self._call(self.network, x, t)
        pred = self.schedule.parameterization
        if pred == "epsilon":
            return out
        abar = self.schedule.abar(t, x)
        if pred == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) x_0
            return abar.sqrt() * out + (1 - abar).sqrt() * x
        return (x - abar.sqrt() * out) / (1 - abar).sqrt()  # "sample": the network predicts x_0

    def freeze(self) -> Denoiser:
        """Eval mode and no weight gradients: reversion only differentiates w.r.t. the input (saves 25-45%)."""
        self.network.eval()
        self.network.requires_grad_(False)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())
