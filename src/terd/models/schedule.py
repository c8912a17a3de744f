"""The discrete VP noise schedule (betas, alphas, cumulative alphas) read from a diffusers config.

The betas are computed by diffusers' own ``DDPMScheduler`` so that every schedule it supports
(linear, scaled_linear, squaredcos_cap_v2, trained_betas) is reproduced bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler

from terd.errors import TerdError

_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class NoiseSchedule:
    """betas_t, alphas_t = 1 - betas_t and abar_t = prod_{s<=t} alphas_s for t in 0..T-1 (float32)."""

    betas: torch.Tensor
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = self.betas.to(torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        cfg = {k: config[k] for k in _SCHEDULE_KEYS if k in config and config[k] is not None}
        pred = config.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise TerdError(f"unsupported prediction_type {pred!r} in the scheduler config (terd needs 'epsilon')")
        sched_name = cfg.get("beta_schedule", "linear")
        if "trained_betas" not in cfg and sched_name not in SUPPORTED_BETA_SCHEDULES:
            raise TerdError(
                f"unsupported beta_schedule {sched_name!r} (supported: {', '.join(SUPPORTED_BETA_SCHEDULES)})"
            )
        try:
            sched = DDPMScheduler(**cfg)
        except (TypeError, ValueError, NotImplementedError) as exc:
            raise TerdError(f"invalid scheduler config: {exc}") from None
        return cls(sched.betas.clone(), config=dict(sched.config))

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """The DDPM / DDIM-repo default: betas = linspace(1e-4, 0.02, 1000)."""
        return cls.from_config(
            {"num_train_timesteps": num_timesteps, "beta_start": beta_start, "beta_end": beta_end,
             "beta_schedule": "linear"}
        )

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t gathered for a batch of integer timesteps, shaped to broadcast against ``like``."""
        a = self.alphas_cumprod.to(like.device)[t.to(like.device).long()]
        return a.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def scheduler_config(self) -> dict:
        """A config that stock diffusers schedulers accept (for saving pipelines)."""
        cfg = {k: v for k, v in self.config.items() if not k.startswith("_")}
        cfg.setdefault("num_train_timesteps", self.num_timesteps)
        return cfg
