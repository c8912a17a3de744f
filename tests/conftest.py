"""Shared fixtures: tiny random networks and closed-form "oracle" denoisers."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from terd.models import Denoiser, NoiseSchedule


class PointMassOracle(nn.Module):
    """The exact noise predictor when all data is one image x0*: eps = (x_t - sqrt(abar) x0*) / sqrt(1 - abar)."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.register_buffer("x0", x0)
        self.abars = schedule.alphas_cumprod
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abars[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


class GaussianOracle(nn.Module):
    """Exact eps for data ~ N(m, s^2 I): eps = sqrt(1-abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)."""

    def __init__(self, mean: torch.Tensor, std: float, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.std = std
        self.abars = schedule.alphas_cumprod
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abars[t].view(-1, 1, 1, 1).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self.std**2 + 1 - a)


def oracle_denoiser(net: nn.Module, schedule: NoiseSchedule, shape) -> Denoiser:  # noqa: ANN001
    return Denoiser(net, schedule, shape, family="plain")


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear()


@pytest.fixture
def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
