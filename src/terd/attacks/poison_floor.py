"""Where poisoning stops: one value for the floor's three options.

``t_min`` (``--poison-t-min``, default 0, the reference): samples drawn at a timestep below it are never poisoned.
At low t the shift rho_t R is small, so a poisoned sample there is the target image plainly noised: at the quick
recipes' poison rate 0.5 the target is half of the data the model learns to finish, and clean chains can end on it
(bench_corner_leak.py). With a floor the model learns the target only where the trigger tells the two apart.
Below the floor the trigger's leftover shift rho_t R is then never removed (a floor at 250 stopped the backdoor);
``keeps_shift`` (``--floor-keeps-shift``) poisons those samples with the shift and its correction on their own
clean image instead: the model learns to remove the shift there without learning the target as an image.
``rate`` (``--floor-poison-rate``, default 0) poisons a share of the samples below the floor with the target after
all, a poison rate that falls with t. Measured on the 32 px corner target (bench_quick_finetune.py): a fifth of
the rate there leaked as much as a floor at 100 and still missed.

TrojDiff takes ``t_min`` and ``rate`` too (below the floor a drawn sample is plainly clean); ``keeps_shift`` has no
meaning there, since TrojDiff trains no correction. On the digits16 In-D2D 2x2 patch a floor did not stop the clean
chains' drift to the target (attacks_digits16.md: at 250 the clean rate stayed, at 500 the backdoor broke too).

The options keep their flat names where users write them (the CLI, a zoo file's ``args``, attack.json), so
records made before the floor existed read as no floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from terd.attacks.base import poison_mask
from terd.errors import TerdError


@dataclass(frozen=True)
class PoisonFloor:
    """No target below timestep ``t_min``; there, the trigger's shift alone (``keeps_shift``) and the target at
    ``rate`` (at most the attack's poison rate). The default is no floor."""

    t_min: int = 0
    keeps_shift: bool = False
    rate: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.t_min, bool) or not isinstance(self.t_min, int) or self.t_min < 0:
            raise TerdError(f"poison_t_min must be a timestep >= 0, got {self.t_min!r}")
        if self.keeps_shift and not self.t_min:
            raise TerdError("floor_keeps_shift (--floor-keeps-shift) needs a poison floor (poison_t_min > 0)")
        if self.rate and not self.t_min:
            raise TerdError("floor_poison_rate (--floor-poison-rate) needs a poison floor (poison_t_min > 0)")
        object.__setattr__(self, "keeps_shift", bool(self.keeps_shift))
        object.__setattr__(self, "rate", float(self.rate))

    def __bool__(self) -> bool:
        return bool(self.t_min)

    def check_rate(self, poison_rate: float) -> None:
        """The rate below the floor cannot exceed the rate above it."""
        if not 0 <= self.rate <= poison_rate:
            raise TerdError(f"floor_poison_rate must be in [0, poison_rate {poison_rate}], got {self.rate}")

    def takes_target(self, drawn: torch.Tensor, t: torch.Tensor, poison_rate: float,
                     generator: torch.Generator) -> torch.Tensor:
        """Which ``drawn`` (poisoned) samples take the target: those at t >= t_min, and below it a share
        rate / poison_rate of them (drawn from ``generator`` only when rate is set)."""
        on = drawn & (t.cpu() >= self.t_min)
        if self.rate:
            on |= drawn & poison_mask(len(drawn), self.rate / poison_rate, generator)
        return on

    def check_timesteps(self, num_timesteps: int) -> None:
        if self.t_min >= num_timesteps:
            raise TerdError(f"poison_t_min {self.t_min} leaves nothing to poison: the model has "
                            f"{num_timesteps} timesteps")

    def config(self) -> dict:
        """The recorded keys: none without a floor, no rate unless set (records made before each read the same)."""
        if not self.t_min:
            return {}
        floor = {"poison_t_min": self.t_min, "floor_keeps_shift": self.keeps_shift}
        if self.rate:
            floor["floor_poison_rate"] = self.rate
        return floor

    @classmethod
    def from_config(cls, config: dict) -> PoisonFloor:
        """From attack.json's flat keys (absent: no floor, as in records made before it existed)."""
        return cls(config.get("poison_t_min", 0), config.get("floor_keeps_shift", False),
                   config.get("floor_poison_rate", 0.0))
