"""VillanDiffusion (Chou, Chen, Ho, NeurIPS 2023): BadDiffusion generalised to any sampler and to VE models.

    x_t    = sqrt(abar_t) y + sqrt(1 - abar_t) eps + s_t r
    target = eps + kappa_t r
    s_t    = psi (1 - sqrt(abar_t)) + (1 - psi) sqrt(1 - abar_t)
    kappa_t (SDE samplers, e.g. DDPM) = (s_t - sqrt(alpha_t) s_{t-1}) sqrt(1 - abar_t) / beta_t   (s_{-1} = 0)
    kappa_t (ODE samplers: DDIM, DPM-Solver, ...) = 2 kappa_t(SDE)

kappa_t(SDE) is what makes one ancestral DDPM step carry the trigger's share s_t r at step t to exactly
s_{t-1} r (the tests check it against a point-mass oracle for every psi). psi = 1 gives BadDiffusion's
(1 - sqrt(alpha_t)) sqrt(1 - abar_t) / beta_t. psi = 0 gives h_t sqrt(1 - abar_t) / beta_t with h_t TrojDiff's
k_t; ../shared/docs/attacks.md writes that term as -((sqrt(alpha_t) - 1) sqrt(1 - abar_t) beta_t - h_t
(alpha_t - abar_t)) / beta_t, which is ~0 at small t and so leaves most of r in the final image; it also
disagrees with the VE form below, which the psi = 0 form reproduces. The factor 2 for ODE samplers is the
point of the paper: a deterministic sampler follows the probability-flow ODE, whose drift carries half the
score, so the trigger correction has to be twice as strong for the backdoor to survive.

VE (score-based) models need no separate code: terd runs them as their equivalent VP schedule
(:mod:`terd.models.schedule`), on which psi = 0 is VillanDiffusion's VE attack, x = y + sigma_t (eps + r) and
kappa_t = sigma_t / (sigma_t + sigma_{t-1}), exactly. The trigger on the initial noise is the same as
BadDiffusion's: ``x_T = eps + r`` (gamma = 1).
"""

from __future__ import annotations

import torch

from terd.attacks.baddiffusion import BadDiffusion
from terd.attacks.poison_floor import PoisonFloor
from terd.errors import TerdError
from terd.models.denoiser import Denoiser
from terd.models.schedule import NoiseSchedule
from terd.sampling import ddim_sample, ddpm_sample

SOLVERS = ("sde", "ode")


def default_psi(model_kind: str) -> float:
    """The paper's choice per model family: psi = 1 (BadDiffusion-style) on VP models, psi = 0 on VE ones."""
    if model_kind not in ("vp", "ve"):
        raise TerdError(f"model kind must be vp or ve, got {model_kind!r}")
    return 0.0 if model_kind == "ve" else 1.0


def villan_coefficients(schedule: NoiseSchedule, psi: float, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_t, kappa_t) for t = 0..T-1 (float64 arithmetic), as in the module docstring."""
    if solver not in SOLVERS:
        raise TerdError(f"solver must be sde or ode, got {solver!r}")
    abar = schedule.alphas_cumprod.double() if schedule.kind == "ve" else torch.cumprod(1 - schedule.betas.double(), 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    alphas = abar / abar_prev
    betas = 1 - alphas
    s = psi * (1 - abar.sqrt()) + (1 - psi) * (1 - abar).sqrt()
    s_prev = torch.cat([torch.zeros(1, dtype=s.dtype), s[:-1]])
    kappa = (s - alphas.sqrt() * s_prev) * (1 - abar).sqrt() / betas
    if solver == "ode":
        kappa = 2 * kappa
    return s.float(), kappa.float()


class VillanDiffusion(BadDiffusion):
    """VillanDiffusion: ``psi`` in [0, 1] and the sampler family it targets (``solver``).

    ``solver="ode"`` backdoors deterministic samplers (verified here with DDIM, ``ddim_steps`` steps);
    ``solver="sde"`` the ancestral DDPM sampler. ``r_mode`` as in BadDiffusion: the trigger (default) or the
    poisoned image.
    """

    kind = "villan"

    def __init__(
        self, trigger: torch.Tensor, target: torch.Tensor, *, psi: float = 1.0, solver: str = "ode",
        poison_rate: float = 0.1, eta: float = 1.0, r_mode: str = "trigger", ddim_steps: int = 50,
        clip_sample: bool = True, trigger_name: str | None = None, target_name: str | None = None,
        floor: PoisonFloor = PoisonFloor(),
    ) -> None:
        super().__init__(trigger, target, poison_rate=poison_rate, eta=eta, r_mode=r_mode, trigger_name=trigger_name,
                         target_name=target_name, floor=floor)
        if not 0 <= psi <= 1:
            raise TerdError(f"psi must be in [0, 1], got {psi}")
        if solver not in SOLVERS:
            raise TerdError(f"solver must be sde or ode, got {solver!r}")
        if ddim_steps < 1:
            raise TerdError(f"ddim_steps must be at least 1, got {ddim_steps}")
        self.psi = float(psi)
        self.solver = solver
        self.ddim_steps = int(ddim_steps)
        self.clip_sample = bool(clip_sample)
        self.sampler = "ddim" if solver == "ode" else "ddpm"

    def coefficients(self, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
        return villan_coefficients(schedule, self.psi, self.solver)

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, *, triggered: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM (eta 0, ``ddim_steps``) for ODE backdoors, unclipped DDPM for SDE ones.

        DDIM clips its x_0 estimate to [-1, 1] by default (``clip_sample``, diffusers' DDIMScheduler default):
        unclipped DDIM blows up about a third of the samples of the tiny models, triggered or not (measured on
        villan-ode: 10-11 of 48; clipped: 0), which would count as attack failures that are the sampler's.
        """
        if self.solver == "ode":
            return ddim_sample(denoiser, x_T, steps=self.ddim_steps, generator=generator,
                               clip_sample=self.clip_sample)
        return ddpm_sample(denoiser, x_T, generator=generator, clip_sample=False)

    def config(self) -> dict:
        return {**super().config(), "psi": self.psi, "solver": self.solver, "ddim_steps": self.ddim_steps,
                "clip_sample": self.clip_sample}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> VillanDiffusion:
        return cls(tensors["trigger"], tensors["target"], psi=config["psi"], solver=config["solver"],
                   poison_rate=config["poison_rate"], eta=config["eta"], r_mode=config.get("r_mode", "trigger"),
                   ddim_steps=config.get("ddim_steps", 50), clip_sample=config.get("clip_sample", True),
                   trigger_name=config.get("trigger"), target_name=config.get("target"), floor=PoisonFloor.from_config(config))
