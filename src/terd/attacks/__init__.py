"""Backdoor attacks on diffusion models, each a small object the one training loop accepts as objective.

- :class:`BadDiffusion`, :class:`VillanDiffusion` (VP: psi, SDE/ODE), :class:`TrojDiff` (In-D2D, Out-D2D,
  D2I; blend and patch triggers; its backdoor-aware DDPM/DDIM samplers); :class:`PoisonFloor`, where
  BadDiffusion-style poisoning stops
- :mod:`terd.attacks.triggers`: procedural triggers and targets at any size
- :func:`build_attack` / :func:`attack_model`: names -> attack object -> backdoored model directory
- :func:`load_attack`: rebuild the attack of a saved model; :func:`evaluate_attack`: does the backdoor fire?
"""

from terd.attacks.baddiffusion import BadDiffusion, baddiffusion_coefficients
from terd.attacks.base import Attack, load_attack, load_true_trigger, save_attack
from terd.attacks.build import ATTACK_KINDS, attack_model, build_attack
from terd.attacks.evaluation import evaluate_attack
from terd.attacks.poison_floor import PoisonFloor
from terd.attacks.triggers import TARGETS, TRIGGERS, make_target, make_trigger
from terd.attacks.trojdiff import (
    TrojDiff,
    trojan_k,
    trojdiff_ddim_sample,
    trojdiff_ddpm_sample,
    trojdiff_timesteps,
)
from terd.attacks.villan import VillanDiffusion, villan_coefficients

__all__ = [
    "ATTACK_KINDS", "TARGETS", "TRIGGERS", "Attack", "BadDiffusion", "PoisonFloor", "TrojDiff", "VillanDiffusion", "attack_model",
    "baddiffusion_coefficients", "build_attack", "evaluate_attack", "load_attack", "load_true_trigger",
    "make_target", "make_trigger", "save_attack", "trojan_k", "trojdiff_ddim_sample", "trojdiff_ddpm_sample",
    "trojdiff_timesteps", "villan_coefficients",
]
