"""The discrete noise schedule (betas, alphas, cumulative alphas) read from a diffusers config.

VP (DDPM) schedules: the betas are computed by diffusers' own ``DDPMScheduler`` so that every schedule it
supports (linear, scaled_linear, squaredcos_cap_v2, trained_betas) is reproduced bit for bit.

VE schedules, x = y + sigma * eps, come in two diffusers formats:

* ``ScoreSdeVeScheduler`` (score-based / NCSN models): geometric sigmas from sigma_min to sigma_max
  (diffusers' ``discrete_sigmas``); the network sees pixels in [0, 1] and answers the score;
* ``EDMEulerScheduler`` (EDM-style preconditioned models, Karras et al. 2022): "exponential" (geometric, the
  VE SDE) or "karras" sigmas; pixels in [-1, 1]; the network F is preconditioned by sigma_data.

A VE model is a VP model in other coordinates (k-diffusion's observation): x_vp = x_ve / sqrt(1 + sigma^2)
has abar = 1 / (1 + sigma^2). So a VE schedule is stored as that equivalent VP schedule plus its sigmas,
and every sampler, attack and detector written for VP models runs on VE models unchanged; only the model
wrapper converts coordinates. For [0, 1]-pixel networks the sigma of the equivalent VP schedule (in terd's
[-1, 1] pixels) is twice the network's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler

from terd.errors import TerdError

_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SCORE_SCHEDULER = "ScoreSdeVeScheduler"
EDM_SCHEDULER = "EDMEulerScheduler"
PIXEL_SCALE = {SCORE_SCHEDULER: 2.0, EDM_SCHEDULER: 1.0}  # network pixels -> terd's [-1, 1]
EDM_SIGMA_SCHEDULES = ("exponential", "karras")
EDM_PREDICTIONS = ("epsilon", "v_prediction")
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _geometric(sigma_min: float, sigma_max: float, num_timesteps: int) -> torch.Tensor:
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise TerdError(f"a VE schedule needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    if num_timesteps < 2:
        raise TerdError(f"a VE schedule needs at least 2 timesteps, got {num_timesteps}")
    return torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), num_timesteps, dtype=torch.float64))


@dataclass
class NoiseSchedule:
    """betas_t, alphas_t = 1 - betas_t and abar_t = prod_{s<=t} alphas_s for t in 0..T-1 (float32).

    ``sigmas`` is None for VP models; for VE models it holds the network's own noise levels (ascending), and
    the betas are those of the equivalent VP schedule.
    """

    betas: torch.Tensor
    config: dict = field(default_factory=dict)
    sigmas: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.sigmas is not None:  # abar from the sigmas directly (a float32 cumprod would drift)
            abar = 1.0 / (1.0 + (self.pixel_scale * self.sigmas.double()) ** 2)
            prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
            self.betas = (1.0 - abar / prev).float()
            self.alphas_cumprod = abar.float()
            self.sigmas = self.sigmas.to(torch.float32)
        self.betas = self.betas.to(torch.float32)
        self.alphas = 1.0 - self.betas
        if self.sigmas is None:
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def kind(self) -> str:
        """"ve" for sigma-parameterised models (score-based or EDM), "vp" for DDPM ones."""
        return "vp" if self.sigmas is None else "ve"

    @property
    def parameterization(self) -> str:
        """How the network is called: "epsilon", "v_prediction" or "sample" (VP models, diffusers' prediction
        types), "score" (ScoreSdeVe) or "edm" (EDM preconditioning)."""
        name = self.config.get("_class_name")
        if name in (SCORE_SCHEDULER, EDM_SCHEDULER):
            return "score" if name == SCORE_SCHEDULER else "edm"
        return self.config.get("prediction_type", "epsilon")

    @property
    def pixel_scale(self) -> float:
        return PIXEL_SCALE.get(self.config.get("_class_name"), 1.0)

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        name = config.get("_class_name")
        try:
            if name == SCORE_SCHEDULER:
                return cls.ve(float(config.get("sigma_min", 0.01)), float(config.get("sigma_max", 1348.0)),
                              int(config.get("num_train_timesteps", 2000)))
            if name == EDM_SCHEDULER:
                keys = ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "rho", "prediction_type")
                return cls.edm(**{k: config[k] for k in keys if k in config},
                               num_timesteps=int(config.get("num_train_timesteps", 1000)))
        except (TypeError, ValueError) as exc:
            raise TerdError(f"invalid {name} config: {exc}") from None
        cfg = {k: config[k] for k in _SCHEDULE_KEYS if k in config and config[k] is not None}
        pred = config.get("prediction_type", "epsilon")
        if pred not in VP_PREDICTIONS:
            raise TerdError(f"unsupported prediction_type {pred!r} in the scheduler config (supported: "
                            f"{', '.join(VP_PREDICTIONS)})")
        sched_name = cfg.get("beta_schedule", "linear")
        if "trained_betas" not in cfg and sched_name not in SUPPORTED_BETA_SCHEDULES:
            raise TerdError(
                f"unsupported beta_schedule {sched_name!r} (supported: {', '.join(SUPPORTED_BETA_SCHEDULES)})"
            )
        try:
            sched = DDPMScheduler(**cfg, prediction_type=pred)
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

    @classmethod
    def ve(cls, sigma_min: float = 0.01, sigma_max: float = 50.0, num_timesteps: int = 1000) -> NoiseSchedule:
        """A VE schedule: sigma_t = exp(linspace(log sigma_min, log sigma_max, T)), as ScoreSdeVeScheduler's
        ``discrete_sigmas`` for T inference steps (network pixels in [0, 1])."""
        config = {"_class_name": SCORE_SCHEDULER, "sigma_min": sigma_min, "sigma_max": sigma_max,
                  "num_train_timesteps": num_timesteps}
        return cls(torch.zeros(num_timesteps), config=config, sigmas=_geometric(sigma_min, sigma_max, num_timesteps))

    @classmethod
    def edm(cls, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
            sigma_schedule: str = "karras", num_timesteps: int = 1000, rho: float = 7.0,
            prediction_type: str = "epsilon") -> NoiseSchedule:
        """An EDM schedule (pixels in [-1, 1]), discretised at T levels: geometric for "exponential" (the VE
        SDE), Karras' sigma_max^(1/rho) .. sigma_min^(1/rho) ramp for "karras"; t = 0 is sigma_min."""
        if sigma_schedule not in EDM_SIGMA_SCHEDULES:
            raise TerdError(f"unsupported sigma_schedule {sigma_schedule!r} (supported: {', '.join(EDM_SIGMA_SCHEDULES)})")
        if prediction_type not in EDM_PREDICTIONS:
            raise TerdError(f"unsupported EDM prediction_type {prediction_type!r} (supported: {', '.join(EDM_PREDICTIONS)})")
        if not sigma_data > 0:
            raise TerdError(f"sigma_data must be positive, got {sigma_data}")
        sigmas = _geometric(sigma_min, sigma_max, num_timesteps)
        if sigma_schedule == "karras":
            ramp = torch.linspace(0, 1, num_timesteps, dtype=torch.float64)
            sigmas = (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
        config = {"_class_name": EDM_SCHEDULER, "sigma_min": sigma_min, "sigma_max": sigma_max,
                  "sigma_data": sigma_data, "sigma_schedule": sigma_schedule, "num_train_timesteps": num_timesteps,
                  "rho": rho, "prediction_type": prediction_type}
        return cls(torch.zeros(num_timesteps), config=config, sigmas=sigmas)

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t gathered for a batch of integer timesteps, shaped to broadcast against ``like``."""
        a = self.alphas_cumprod.to(like.device)[t.to(like.device).long()]
        return a.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def scheduler_config(self) -> dict:
        """A config that stock diffusers schedulers accept (for saving pipelines)."""
        cfg = {k: v for k, v in self.config.items() if not k.startswith("_")}
        if self.kind == "ve":
            return cfg
        cfg.setdefault("num_train_timesteps", self.num_timesteps)
        return cfg
