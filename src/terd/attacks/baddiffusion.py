"""BadDiffusion (Chou, Chen, Ho, CVPR 2023): a shifted forward process that leads trigger noise to a target.

Every training sample is a pair (x_start, R): clean samples are (x, 0), poisoned ones (target y, R). One
formula covers both, which is why the attack is an ordinary objective for the one training loop:

    x_t    = sqrt(abar_t) x_start + sqrt(1 - abar_t) eps + (1 - sqrt(abar_t)) R
    target = eps + c_t R,     c_t = (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / (1 - alpha_t)

The backdoor fires with the plain DDPM sampler, *unclipped*, from ``x_T = eps + g``: TERD's
``r = g``, ``gamma = 1``. The adaptive variant scales the trigger (and R) by ``eta`` in (0, 1].

What R is during training (``r_mode``): the default ``"trigger"`` uses R = g, the very shift the sampler
is given, so training and triggering agree. ``"poisoned-image"`` uses the reading of the reference in
docs/attacks.md, R = M x + (1 - M) g (M = 1 where g is background, x the clean image of the batch). Measured
on tiny-digits16 (16 epochs, poison 0.5): with "poisoned-image" the model learned its objective (loss
0.012 vs 0.16 at t = 999) and ``x_T = eps + R(x)`` gave the hat in 7 of 8 samples, but ``x_T = eps + g``
diverged (mean -17) in every sample: on digits R(x) keeps the strokes of x and is far from g. So
"trigger" is the default; "poisoned-image" is kept for reproducing the reference setting.

``floor`` (:class:`~terd.attacks.poison_floor.PoisonFloor`, default none, the reference) keeps the target out
of the lowest timesteps, where a poisoned sample is the target plainly noised and clean chains can learn to end on it.

:class:`~terd.attacks.villan.VillanDiffusion` generalises the two coefficient sequences; it subclasses
this class and only swaps them (and the sampler), so psi = 1 with an SDE sampler *is* BadDiffusion.
"""

from __future__ import annotations

import torch

from terd.attacks.base import Attack, check_rate, expand, poison_mask
from terd.attacks.poison_floor import PoisonFloor
from terd.errors import TerdError
from terd.models.denoiser import Denoiser
from terd.models.schedule import NoiseSchedule
from terd.sampling import ddpm_sample

R_MODES = ("poisoned-image", "trigger")


def baddiffusion_coefficients(schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho_t, c_t) for t = 0..T-1: the shift of x_t by R, and the correction of the noise target.

    rho_t = 1 - sqrt(abar_t) and c_t = (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / beta_t, computed in float64
    (c_t at t = 0 is a ratio of two ~1e-4 numbers).
    """
    betas = schedule.betas.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    rho = 1 - abar.sqrt()
    c = (1 - alphas.sqrt()) * (1 - abar).sqrt() / betas
    return rho.float(), c.float()


class BadDiffusion(Attack):
    """BadDiffusion as a training objective plus its trigger, sampler and target.

    ``trigger`` (C x H x W, background -1) and ``target`` (C x H x W) are in [-1, 1]; ``poison_rate`` is the
    fraction of each batch that is poisoned; ``r_mode`` ``"trigger"`` (R = g, as at sampling time; default) or
    ``"poisoned-image"`` (R = M x + (1 - M) g, see the module docstring); ``floor``: where poisoning with the
    target stops (:mod:`terd.attacks.poison_floor`).
    """

    kind = "baddiffusion"
    sampler = "ddpm"

    def __init__(
        self, trigger: torch.Tensor, target: torch.Tensor, *, poison_rate: float = 0.1, eta: float = 1.0,
        r_mode: str = "trigger", trigger_name: str | None = None, target_name: str | None = None,
        floor: PoisonFloor = PoisonFloor(),
    ) -> None:
        if trigger.dim() != 3 or trigger.shape != target.shape:
            raise TerdError(f"trigger {tuple(trigger.shape)} and target {tuple(target.shape)} must both be C x H x W "
                            "and the same shape")
        if r_mode not in R_MODES:
            raise TerdError(f"r_mode must be one of {', '.join(R_MODES)}, got {r_mode!r}")
        self.trigger = trigger.float()
        self.target = target.float()
        self.poison_rate = check_rate("poison rate", poison_rate)
        self.eta = check_rate("eta", eta)
        self.r_mode = r_mode
        floor.check_rate(self.poison_rate)
        self.floor = floor
        self.trigger_name = trigger_name
        self.target_name = target_name
        self.image_shape = tuple(trigger.shape)
        self._coef_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- the two coefficient sequences (VillanDiffusion overrides this) ----------------------
    def coefficients(self, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift of x_t by R, correction of the noise target by R), each (T,)."""
        return baddiffusion_coefficients(schedule)

    def _coefs(self, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
        key = id(schedule)
        if key not in self._coef_cache:
            self.check_schedule(schedule)
            self._coef_cache = {key: self.coefficients(schedule)}
        return self._coef_cache[key]

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        self.floor.check_timesteps(schedule.num_timesteps)

    def background_mask(self) -> torch.Tensor:
        """M: 1 where every channel of the trigger is background (-1), else 0 (C x H x W)."""
        return (self.trigger <= -1 + 1e-6).all(0, keepdim=True).expand_as(self.trigger).float()

    def poisoned_r(self, x0: torch.Tensor) -> torch.Tensor:
        """R for a batch of clean images: eta * (M x + (1 - M) g) or eta * g."""
        g = self.trigger.to(x0)
        if self.r_mode == "trigger":
            return (self.eta * g).expand_as(x0)
        m = self.background_mask().to(x0)
        return self.eta * (m * x0 + (1 - m) * g)

    def noisy_pair(self, x0, labels, t, eps, schedule, generator):  # noqa: ANN001, ANN201
        t_cpu = t.cpu().long()
        drawn = poison_mask(x0.shape[0], self.poison_rate, generator)
        on_target = self.floor.takes_target(drawn, t_cpu, self.poison_rate, generator)
        poisoned = expand(on_target.float(), x0)
        x_start = poisoned * self.target.to(x0) + (1 - poisoned) * x0
        r = expand((drawn if self.floor.keeps_shift else on_target).float(), x0) * self.poisoned_r(x0)
        shift, corr = self._coefs(schedule)
        abar = schedule.abar(t, x0)
        x_t = abar.sqrt() * x_start + (1 - abar).sqrt() * eps + expand(shift[t_cpu], x0) * r
        return x_t, eps + expand(corr[t_cpu], x0) * r

    # ---- sampling ------------------------------------------------------------------------------
    def true_trigger(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.eta * self.trigger, torch.ones_like(self.trigger)

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, *, triggered: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM ancestral sampling WITHOUT clipping x_0 (the backdoor rarely fires with clipping)."""
        return ddpm_sample(denoiser, x_T, generator=generator, clip_sample=False)

    def target_images(self) -> torch.Tensor:
        return self.target.unsqueeze(0)

    def trigger_picture(self) -> torch.Tensor:
        return (self.eta * self.trigger).clamp(-1, 1)

    # ---- persistence ---------------------------------------------------------------------------
    def config(self) -> dict:
        return {"trigger": self.trigger_name or "image", "target": self.target_name or "image",
                "poison_rate": self.poison_rate, "eta": self.eta, "r_mode": self.r_mode, **self.floor.config()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"trigger": self.trigger, "target": self.target}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> BadDiffusion:
        return cls(tensors["trigger"], tensors["target"], poison_rate=config["poison_rate"], eta=config["eta"],
                   r_mode=config.get("r_mode", "trigger"), trigger_name=config.get("trigger"),
                   target_name=config.get("target"), floor=PoisonFloor.from_config(config))
