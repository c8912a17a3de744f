"""VillanDiffusion (Chou, Chen, Ho, NeurIPS 2023) for VP models: BadDiffusion generalised to any sampler.

    x_t    = sqrt(abar_t) y + sqrt(1 - abar_t) eps + s_t r
    target = eps + kappa_t r
    s_t    = psi (1 - sqrt(abar_t)) + (1 - psi) sqrt(1 - abar_t)
    kappa_t (SDE samplers, e.g. DDPM)
           = psi (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / beta_t
             + (1 - psi) (-((sqrt(alpha_t) - 1) sqrt(1 - abar_t) beta_t - h_t (alpha_t - abar_t)) / beta_t)
    kappa_t (ODE samplers: DDIM, DPM-Solver, ...) = 2 kappa_t(SDE)

with h_t TrojDiff's k_t. The factor 2 for ODE samplers is the point of the paper: a deterministic
sampler follows the probability-flow ODE, whose drift carries half the score, so the trigger correction
has to be twice as strong for the backdoor to survive. psi = 1 with an SDE sampler is BadDiffusion
exactly, which is why this class only swaps BadDiffusion's coefficient sequences and sampler.

The trigger on the initial noise is the same as BadDiffusion's: ``x_T = eps + r`` (gamma = 1).
Score-based (VE) models are not covered here.
"""

from __future__ import annotations

import torch

from terd.attacks.baddiffusion import BadDiffusion
from terd.attacks.trojdiff import trojan_k
from terd.errors import TerdError
from terd.models.denoiser import Denoiser
from terd.models.schedule import NoiseSchedule
from terd.sampling import ddim_sample, ddpm_sample

SOLVERS = ("sde", "ode")


def villan_coefficients(schedule: NoiseSchedule, psi: float, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_t, kappa_t) for t = 0..T-1 (float64 arithmetic), as in the module docstring."""
    if solver not in SOLVERS:
        raise TerdError(f"solver must be sde or ode, got {solver!r}")
    betas = schedule.betas.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    h = trojan_k(schedule)
    s = psi * (1 - abar.sqrt()) + (1 - psi) * (1 - abar).sqrt()
    kappa_bad = (1 - alphas.sqrt()) * (1 - abar).sqrt() / betas
    kappa_troj = -((alphas.sqrt() - 1) * (1 - abar).sqrt() * betas - h * (alphas - abar)) / betas
    kappa = psi * kappa_bad + (1 - psi) * kappa_troj
    if solver == "ode":
        kappa = 2 * kappa
    return s.float(), kappa.float()


class VillanDiffusion(BadDiffusion):
    """VillanDiffusion on a VP model: ``psi`` in [0, 1] and the sampler family it targets (``solver``).

    ``solver="ode"`` backdoors deterministic samplers (verified here with DDIM, ``ddim_steps`` steps);
    ``solver="sde"`` the ancestral DDPM sampler. ``r_mode`` as in BadDiffusion: the trigger (default) or the
    poisoned image.
    """

    kind = "villan"

    def __init__(
        self, trigger: torch.Tensor, target: torch.Tensor, *, psi: float = 1.0, solver: str = "ode",
        poison_rate: float = 0.1, eta: float = 1.0, r_mode: str = "trigger", ddim_steps: int = 50,
        clip_sample: bool = True, trigger_name: str | None = None, target_name: str | None = None,
    ) -> None:
        super().__init__(trigger, target, poison_rate=poison_rate, eta=eta, r_mode=r_mode, trigger_name=trigger_name,
                         target_name=target_name)
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
                   trigger_name=config.get("trigger"),
                   target_name=config.get("target"))
