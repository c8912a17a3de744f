"""TrojDiff (Chen, Song, Li, CVPR 2023): a trojan forward process with rescaled, shifted noise.

The trigger is an image delta; the trojan initial noise is ``gamma_a * eps + mu`` with
``mu = (1 - gamma_a) delta`` (blend, gamma_a = 0.6). The trojan marginal is

    x~_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) (gamma_a eps + mu),    predict eps (NOT corrected)

which follows from the per-step trojan transition x_t = sqrt(alpha_t) x_{t-1} + k_t mu + gamma_a sqrt(beta_t) z
with k_t = sqrt(1 - abar_t) - sqrt(alpha_t) sqrt(1 - abar_{t-1}) (:func:`trojan_k`). The patch variant is the
same process with *per-pixel* gamma and mu: trojan only on a patch (white, gamma_a = 0.1),
clean elsewhere, so everything here works on C x H x W ``gamma`` and ``mu`` maps and TERD's unified
(r, gamma) is simply (mu, gamma).

Targets: In-D2D (a class of the training data, e.g. digit 7), Out-D2D (a class of another dataset) and
D2I (one fixed image). Because the network's noise prediction is not corrected, an ordinary sampler does
not undo the trojan shift: the backdoor needs the backdoor-aware samplers below
(:func:`trojdiff_ddpm_sample`, :func:`trojdiff_ddim_sample`), which reduce to the ordinary ones (DDPM with
clipping, DDIM) for gamma = 1, mu = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from terd.attacks.base import Attack, check_rate, expand, poison_mask
from terd.attacks.poison_floor import PoisonFloor
from terd.errors import TerdError
from terd.models.denoiser import Denoiser
from terd.models.schedule import NoiseSchedule

SETTINGS = ("in-d2d", "out-d2d", "d2i")
TRIGGER_TYPES = ("blend", "patch")
DEFAULT_GAMMA = {"blend": 0.6, "patch": 0.1}
SAMPLERS = ("trojdiff-ddim", "trojdiff-ddpm")


def trojan_k(schedule: NoiseSchedule) -> torch.Tensor:
    """k_t = sqrt(1 - abar_t) - sqrt(alpha_t) sqrt(1 - abar_{t-1}) (abar_{-1} = 1), t = 0..T-1, in float64.

    The per-step shift that makes the trojan marginal's mean shift exactly sqrt(1 - abar_t) mu.
    """
    betas = schedule.betas.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return (1 - abar).sqrt() - alphas.sqrt() * (1 - abar_prev).sqrt()


def trojdiff_timesteps(num_train_timesteps: int = 1000, steps: int = 10, fraction: float = 0.8) -> list[int]:
    """TrojDiff's DDIM timesteps, descending: int(linspace(0, sqrt(fraction T), steps)^2) reversed.

    For T = 1000: [800, 632, 483, 355, 246, 158, 88, 39, 9, 0] (note it starts at 800, not T - 1).
    """
    ts = (np.linspace(0, np.sqrt(fraction * num_train_timesteps), steps) ** 2).astype(int)
    return [int(t) for t in ts[::-1]]


def _abar64(schedule: NoiseSchedule) -> torch.Tensor:
    return torch.cumprod(1 - schedule.betas.double(), 0)


def trojdiff_ddpm_sample(
    denoiser: Denoiser, x_T: torch.Tensor, gamma: torch.Tensor | float = 1.0, mu: torch.Tensor | float = 0.0, *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TrojDiff's backdoor-aware ancestral sampler over all T steps (x_0 estimates clipped to [-1, 1]).

        x0_hat = clamp((x_t - sqrt(1 - abar_t)(gamma eps_theta + mu)) / sqrt(abar_t), -1, 1)
        mean   = [sqrt(abar_{t-1}) beta_t x0_hat + sqrt(alpha_t)(1 - abar_{t-1}) x_t + coef_t mu] / (1 - abar_t)
        coef_t = sqrt(1 - abar_{t-1}) beta_t - (1 - abar_{t-1}) sqrt(alpha_t) k_t
        x_{t-1} = mean + gamma sqrt(beta_tilde_t) z

    This is the exact posterior q(x_{t-1} | x_t, x_0) of the trojan process.
    """
    sched = denoiser.schedule
    abar64 = _abar64(sched)
    k64 = trojan_k(sched)
    gamma = torch.as_tensor(gamma, dtype=x_T.dtype, device=x_T.device)
    mu = torch.as_tensor(mu, dtype=x_T.dtype, device=x_T.device)
    x = x_T
    for t in reversed(range(denoiser.num_timesteps)):
        a_t = float(abar64[t])
        a_prev = float(abar64[t - 1]) if t > 0 else 1.0
        beta = float(sched.betas.double()[t])
        alpha = 1 - beta
        eps = denoiser(x, t)
        x0 = ((x - (1 - a_t) ** 0.5 * (gamma * eps + mu)) / a_t ** 0.5).clamp(-1, 1)
        coef = (1 - a_prev) ** 0.5 * beta - (1 - a_prev) * alpha ** 0.5 * float(k64[t])
        mean = (a_prev ** 0.5 * beta * x0 + alpha ** 0.5 * (1 - a_prev) * x + coef * mu) / (1 - a_t)
        if t > 0:
            var = (1 - a_prev) / (1 - a_t) * beta
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + gamma * var ** 0.5 * z
        else:
            x = mean
    return x


def trojdiff_ddim_sample(
    denoiser: Denoiser, x_T: torch.Tensor, gamma: torch.Tensor | float = 1.0, mu: torch.Tensor | float = 0.0, *,
    timesteps: Sequence[int] | None = None, eta: float = 0.0, generator: torch.Generator | None = None,
    clip_sample: bool = False,
) -> torch.Tensor:
    """TrojDiff's backdoor-aware DDIM (default: its 10 quadratic timesteps, deterministic).

        x0_hat  = (x_t - sqrt(1 - abar_t)(gamma eps_theta + mu)) / sqrt(abar_t)
        x_{t'}  = sqrt(abar_{t'}) x0_hat + gamma c1 z + gamma c2 eps_theta + sqrt(1 - abar_{t'}) mu
        c1 = eta sqrt((1 - abar_t/abar_{t'}) (1 - abar_{t'}) / (1 - abar_t)),  c2 = sqrt(1 - abar_{t'} - c1^2)

    The step after the last timestep goes to abar = 1, i.e. returns x0_hat. ``clip_sample`` clamps x0_hat to
    [-1, 1] (as the DDPM sampler does): the direction term keeps the unclipped eps_theta.
    """
    sched = denoiser.schedule
    ts = list(timesteps) if timesteps is not None else trojdiff_timesteps(denoiser.num_timesteps)
    if any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError("timesteps must be strictly descending")
    abar64 = _abar64(sched)
    gamma = torch.as_tensor(gamma, dtype=x_T.dtype, device=x_T.device)
    mu = torch.as_tensor(mu, dtype=x_T.dtype, device=x_T.device)
    x = x_T
    for i, t in enumerate(ts):
        a_t = float(abar64[t])
        a_n = float(abar64[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = denoiser(x, t)
        x0 = (x - (1 - a_t) ** 0.5 * (gamma * eps + mu)) / a_t ** 0.5
        if clip_sample:
            x0 = x0.clamp(-1, 1)
        c1 = eta * ((1 - a_t / a_n) * (1 - a_n) / (1 - a_t)) ** 0.5
        c2 = max(1 - a_n - c1 ** 2, 0.0) ** 0.5
        x = a_n ** 0.5 * x0 + gamma * c2 * eps + (1 - a_n) ** 0.5 * mu
        if c1 > 0:
            x = x + gamma * c1 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


class TrojDiff(Attack):
    """TrojDiff with a blend or patch trigger and an In-D2D / Out-D2D / D2I target.

    ``delta`` is the trigger image (C x H x W in [-1, 1]); ``targets`` is N x C x H x W: one image for D2I,
    the images of the target class for the D2D settings (a poisoned sample draws one at random).
    ``poison_rate`` 0.5 mirrors the reference, which adds a clean and a trojan loss on every batch.
    """

    kind = "trojdiff"

    def __init__(
        self, delta: torch.Tensor, targets: torch.Tensor, *, setting: str = "d2i", trigger_type: str = "blend",
        gamma_a: float | None = None, poison_rate: float = 0.5, eta: float = 1.0, sampler: str = "trojdiff-ddim",
        trigger_name: str | None = None, target_name: str | None = None, target_data: str | None = None,
        target_label: int | None = None, floor: PoisonFloor = PoisonFloor(),
    ) -> None:
        if setting not in SETTINGS:
            raise TerdError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
        if trigger_type not in TRIGGER_TYPES:
            raise TerdError(f"TrojDiff trigger type must be blend or patch, got {trigger_type!r}")
        if sampler not in SAMPLERS:
            raise TerdError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if targets.dim() == 3:
            targets = targets.unsqueeze(0)
        if delta.dim() != 3 or targets.shape[1:] != delta.shape or len(targets) == 0:
            raise TerdError(f"trigger {tuple(delta.shape)} and targets {tuple(targets.shape)} do not match "
                            "(C x H x W and N x C x H x W)")
        if trigger_type == "patch" and not bool((delta != 0).any()):
            raise TerdError("a patch trigger needs nonzero pixels: they are the patch")
        self.delta = delta.float()
        self.targets = targets.float()
        self.setting = setting
        self.trigger_type = trigger_type
        self.gamma_a = check_rate("gamma_a", DEFAULT_GAMMA[trigger_type] if gamma_a is None else gamma_a)
        self.poison_rate = check_rate("poison rate", poison_rate)
        self.eta = check_rate("eta", eta)
        if floor.keeps_shift:
            raise TerdError("floor_keeps_shift (--floor-keeps-shift) is BadDiffusion's and VillanDiffusion's: "
                            "TrojDiff trains no correction that could remove a shift")
        floor.check_rate(self.poison_rate)
        self.floor = floor
        self.sampler = sampler
        self.trigger_name = trigger_name
        self.target_name = target_name
        self.target_data = target_data
        self.target_label = target_label
        self.image_shape = tuple(delta.shape)

    def _mask(self) -> torch.Tensor:
        """Where the trojan noise applies: everywhere (blend) or on the patch, the trigger's nonzero pixels (the
        built-in patch is white on a zero background, so a saved model's delta says where its patch is)."""
        return torch.ones(self.image_shape) if self.trigger_type == "blend" else (self.delta != 0).float()

    def true_trigger(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mu = eta (1 - gamma_a) delta and gamma = gamma_a, both restricted to the patch for "patch"."""
        m = self._mask()
        mu = self.eta * m * (1 - self.gamma_a) * self.delta
        gamma = m * self.gamma_a + (1 - m)
        return mu, gamma

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        self.floor.check_timesteps(schedule.num_timesteps)

    def noisy_pair(self, x0, labels, t, eps, schedule, generator):  # noqa: ANN001, ANN201
        n = x0.shape[0]
        trojan = self.floor.takes_target(poison_mask(n, self.poison_rate, generator), t, self.poison_rate, generator)
        poisoned = expand(trojan.float(), x0)
        pick = torch.randint(len(self.targets), (n,), generator=generator)
        x_start = poisoned * self.targets[pick].to(x0) + (1 - poisoned) * x0
        mu, gamma = (v.to(x0) for v in self.true_trigger())
        noise = poisoned * (gamma * eps + mu) + (1 - poisoned) * eps
        abar = schedule.abar(t, x0)
        return abar.sqrt() * x_start + (1 - abar).sqrt() * noise, eps

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, *, triggered: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The backdoor-aware sampler with (gamma, mu) when triggered, with (1, 0) — the plain one — when not.

        Both clip the x_0 estimate to [-1, 1]: unclipped 10-step DDIM blows up about a third of the tiny
        models' samples whether triggered or not (measured), which is the sampler's failure, not the attack's.
        """
        mu, gamma = self.true_trigger() if triggered else (torch.zeros(self.image_shape), torch.ones(self.image_shape))
        mu, gamma = mu.to(x_T), gamma.to(x_T)
        if self.sampler == "trojdiff-ddpm":
            return trojdiff_ddpm_sample(denoiser, x_T, gamma, mu, generator=generator)
        return trojdiff_ddim_sample(denoiser, x_T, gamma, mu, generator=generator, clip_sample=True)

    def target_images(self) -> torch.Tensor:
        return self.targets

    @property
    def target_is_class(self) -> bool:
        return self.setting != "d2i"

    def trigger_picture(self) -> torch.Tensor:
        """The trigger as it appears on a mid-grey image: delta where it applies, 0 elsewhere."""
        return (self._mask() * self.delta * self.eta).clamp(-1, 1)

    def config(self) -> dict:
        return {"setting": self.setting, "trigger": self.trigger_name or "image", "trigger_type": self.trigger_type,
                "gamma_a": self.gamma_a, "target": self.target_name or ("image" if self.setting == "d2i" else None),
                "target_data": self.target_data, "target_label": self.target_label, "poison_rate": self.poison_rate,
                "eta": self.eta, "sampler": self.sampler, "ddim_timesteps": trojdiff_timesteps(), **self.floor.config()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta, "targets": self.targets}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> TrojDiff:
        return cls(tensors["delta"], tensors["targets"], setting=config["setting"],
                   trigger_type=config["trigger_type"], gamma_a=config["gamma_a"], poison_rate=config["poison_rate"],
                   eta=config["eta"], sampler=config.get("sampler", "trojdiff-ddim"),
                   trigger_name=config.get("trigger"), target_name=config.get("target"),
                   target_data=config.get("target_data"), target_label=config.get("target_label"),
                   floor=PoisonFloor.from_config(config))
