"""The one model wrapper: any supported network answers "what unit noise is in x_t at step t?".

Everything downstream (samplers, attacks, trigger reversion, detectors) talks to a
:class:`Denoiser` only, so a new model family needs nothing but a new wrapper here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from terd.models.schedule import VE_PIXEL_SCALE, NoiseSchedule


def _diffusers_eps(network: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return network(x, t).sample


def _plain_eps(network: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return network(x, t)


def ve_network_input(x: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in the score network's own coordinates, its sigma) for x in terd's VP coordinates at steps ``t``.

    x_vp = sqrt(abar_t) (y + 2 sigma_t eps) with y in [-1, 1]  ->  x_net = (x_vp / sqrt(abar_t) + 1) / 2
    = y01 + sigma_t eps, the NCSN convention (pixels in [0, 1]).
    """
    sigma = schedule.sigmas.to(x.device)[t].to(x.dtype)
    abar = schedule.abar(t, x)
    return (x / abar.sqrt() + 1.0) / VE_PIXEL_SCALE, sigma


class Denoiser(nn.Module):
    """eps_theta(x_t, t) for a discrete network, plus its noise schedule.

    ``x`` is a batch in pixel space [-1, 1]; ``t`` an integer timestep (python int, 0-d or (B,) tensor).
    VP (DDPM) networks predict eps directly. VE score networks (``schedule.kind == "ve"``; a diffusers
    UNet2DModel with Fourier time embedding whose output is the score) are called in their own coordinates
    at sigma_t and answer eps = -sigma_t * score, so everything downstream sees one kind of model.
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
            x_net, sigma = ve_network_input(x, t, self.schedule)
            return -sigma.view(-1, *([1] * (x.dim() - 1))) * self._call(self.network, x_net, sigma)
        return self._call(self.network, x, t)

    def freeze(self) -> Denoiser:
        """Eval mode and no weight gradients: reversion only differentiates w.r.t. the input (saves 25-45%)."""
        self.network.eval()
        self.network.requires_grad_(False)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())
