"""Elijah baseline: the inversion finds a BadDiffusion-style shift on a closed-form backdoored model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import oracle_denoiser
from terd.defense.elijah import fit_spread_threshold, generation_spread, invert_trigger
from terd.models import NoiseSchedule


class ShiftedOracle(nn.Module):
    """eps_theta(x, T) = x - 0.5 g: the t = T behaviour of a model backdoored with trigger g (c_T = 0.5)."""

    def __init__(self, g: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("g", g)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x - 0.5 * self.g


def test_inversion_recovers_the_shift_of_a_backdoored_oracle():
    g = torch.zeros(1, 6, 6)
    g[:, 3:, 3:] = 1.0
    den = oracle_denoiser(ShiftedOracle(g), NoiseSchedule.linear(), (1, 6, 6))
    # a large batch: with 16 noises the objective's own sampling noise (std 0.25 per pixel) dominates
    tau, loss, evals = invert_trigger(den, steps=300, lr=0.05, batch=256, seed=0)
    assert evals == 300 * 256
    assert (tau - g).abs().mean() < 0.1


def test_inversion_on_a_benign_oracle_stays_near_zero():
    den = oracle_denoiser(ShiftedOracle(torch.zeros(1, 6, 6)), NoiseSchedule.linear(), (1, 6, 6))
    tau, _, _ = invert_trigger(den, steps=300, lr=0.05, batch=256, seed=0)
    assert tau.abs().mean() < 0.1


def test_spread_and_threshold():
    g = torch.Generator().manual_seed(0)
    same = torch.ones(8, 1, 4, 4)
    assert generation_spread(same) == 0.0
    assert generation_spread(0.4 * torch.randn(64, 1, 4, 4, generator=g)) == pytest.approx(0.4, abs=0.06)
    blown_up = 50 * torch.randn(64, 1, 4, 4, generator=g)  # out-of-range samples count as the images they would be
    assert generation_spread(blown_up) == pytest.approx(generation_spread(blown_up.clamp(-1, 1)))
    assert generation_spread(blown_up) <= (64 / 63) ** 0.5  # the largest sample std of 64 values in [-1, 1]
    assert fit_spread_threshold([0.5, 0.6, 0.55]) < 0.5
    with pytest.raises(ValueError):
        fit_spread_threshold([0.5])
