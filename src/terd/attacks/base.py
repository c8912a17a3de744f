"""What every attack object provides, and how an attacked model directory records its attack.

An attack is three things (docs/design.md): how a training sample is poisoned (it is a
:class:`terd.train.Objective`, plugged into the one training loop), how the trigger is put on the initial
noise at sampling time, and the target. TERD's unified picture (docs/terd-method.md, section 1) is that a
backdoor input is ``x_T = gamma * eps + r`` with unit noise ``eps``; every attack states its ``(r, gamma)``
as C x H x W tensors through :meth:`Attack.true_trigger`, which is what the defense is scored against.

Files an attacked model directory gets (besides the diffusers pipeline written by training):

- ``attack.json``               the attack's parameters (``Attack.config()``), enough with the next file
                                to rebuild the object: :func:`load_attack`
- ``attack_tensors.safetensors`` the exact trigger / target tensors used (user images may move or vanish;
                                 PNGs are 8-bit, these are exact)
- ``true_trigger.safetensors``  ``r`` and ``gamma`` (float32, C x H x W)
- ``trigger.png``, ``target.png``
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from terd.errors import TerdError
from terd.models.denoiser import Denoiser
from terd.models.safe_io import load_tensors, read_json
from terd.models.schedule import NoiseSchedule

ATTACK_FILE = "attack.json"
TENSORS_FILE = "attack_tensors.safetensors"
TRUE_TRIGGER_FILE = "true_trigger.safetensors"


def poison_mask(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Which of ``n`` batch samples are poisoned: independent Bernoulli(rate) draws from the loop's generator."""
    return torch.rand(n, generator=generator) < rate


def check_rate(name: str, value: float, *, low_open: bool = True) -> float:
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        raise TerdError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return float(value)


def expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample (B,) coefficient shaped to broadcast against a B x C x H x W batch."""
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


class Attack(ABC):
    """A backdoor attack: training objective, trigger on the initial noise, matching sampler, target.

    Subclasses set ``kind`` (the CLI name) and ``sampler`` (the sampler that fires the backdoor:
    ``ddpm``, ``ddim``, ``trojdiff-ddpm`` or ``trojdiff-ddim``).
    """

    kind: ClassVar[str]
    sampler: str
    image_shape: tuple[int, int, int]

    # ---- training ------------------------------------------------------------------------------
    @abstractmethod
    def noisy_pair(
        self, x0: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor, eps: torch.Tensor,
        schedule: NoiseSchedule, generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t fed to the network, the noise it must predict) for a batch, part of it poisoned."""

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        """Refuse a model schedule this attack cannot train on, before anything is loaded or written (a hook)."""
        return None  # most attacks train on any schedule

    # ---- sampling ------------------------------------------------------------------------------
    @abstractmethod
    def true_trigger(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, gamma), C x H x W each: a backdoor input is ``gamma * eps + r`` for unit noise eps."""

    def backdoor_inputs(self, eps: torch.Tensor) -> torch.Tensor:
        """Put the trigger on unit initial noises (N x C x H x W): ``gamma * eps + r``."""
        r, gamma = self.true_trigger()
        return gamma.to(eps) * eps + r.to(eps)

    @abstractmethod
    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, *, triggered: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Run this attack's sampler from ``x_T`` (already triggered or clean); returns [-1, 1] images."""

    # ---- target --------------------------------------------------------------------------------
    @abstractmethod
    def target_images(self) -> torch.Tensor:
        """The target as N x C x H x W: one image (BadDiffusion, D2I) or a class's images (D2D)."""

    @property
    def target_is_class(self) -> bool:
        """True when the target is a set of images (a class), so success means "looks like one of them"."""
        return False

    @abstractmethod
    def trigger_picture(self) -> torch.Tensor:
        """C x H x W picture of the trigger for ``trigger.png``."""

    # ---- persistence ---------------------------------------------------------------------------
    @abstractmethod
    def config(self) -> dict:
        """JSON-able parameters; with :meth:`tensors` they rebuild the object (:func:`load_attack`)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The exact tensors (trigger, target...) the attack needs, for ``attack_tensors.safetensors``."""

    @classmethod
    @abstractmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> Attack:
        """Inverse of (:meth:`config`, :meth:`tensors`)."""

    def describe(self) -> str:
        """One line for logs and reports (an option left off, recorded as False, is not shown)."""
        c = self.config()
        shown = ("setting", "trigger", "target", "poison_rate", "poison_t_min", "floor_keeps_shift",
                 "floor_poison_rate", "solver", "psi", "eta")
        keys = [k for k in shown if k in c and c[k] is not False]
        return f"{self.kind}(" + ", ".join(f"{k}={c[k]}" for k in keys) + ")"


def _registry() -> dict[str, type[Attack]]:
    from terd.attacks.baddiffusion import BadDiffusion
    from terd.attacks.trojdiff import TrojDiff
    from terd.attacks.villan import VillanDiffusion

    return {cls.kind: cls for cls in (BadDiffusion, TrojDiff, VillanDiffusion)}


def save_attack(attack: Attack, out_dir: str | Path) -> Path:
    """Write attack.json, the exact tensors, true_trigger.safetensors and the trigger/target PNGs."""
    from terd.attacks.triggers import save_picture
    from terd.imaging import save_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"attack": attack.kind, "image_shape": list(attack.image_shape), "sampler": attack.sampler,
           **attack.config()}
    (out_dir / ATTACK_FILE).write_text(json.dumps(cfg, indent=2))
    save_file({k: v.detach().float().contiguous().cpu() for k, v in attack.tensors().items()},
              str(out_dir / TENSORS_FILE))
    r, gamma = attack.true_trigger()
    save_file({"r": r.float().contiguous().cpu(), "gamma": gamma.float().contiguous().cpu()},
              str(out_dir / TRUE_TRIGGER_FILE))
    save_picture(attack.trigger_picture(), out_dir / "trigger.png")
    targets = attack.target_images()
    if attack.target_is_class:
        save_grid(targets[:16], out_dir / "target.png", nrow=4)
    else:
        save_picture(targets[0], out_dir / "target.png")
    return out_dir


def load_attack(model_dir: str | Path) -> Attack:
    """Rebuild the attack object of an attacked model directory (from attack.json + its tensors)."""
    model_dir = Path(model_dir)
    if not (model_dir / ATTACK_FILE).is_file():
        raise TerdError(f"{model_dir}: no {ATTACK_FILE} (not a model made by `terd attack`)")
    cfg = read_json(model_dir / ATTACK_FILE)
    kind = cfg.get("attack")
    registry = _registry()
    if kind not in registry:
        raise TerdError(f"{model_dir / ATTACK_FILE}: unknown attack {kind!r} (known: {', '.join(registry)})")
    tensors = load_tensors(model_dir / TENSORS_FILE)
    try:
        return registry[kind].from_saved(cfg, tensors)
    except KeyError as exc:
        raise TerdError(f"{model_dir}: incomplete attack record (missing {exc})") from None


def load_true_trigger(model_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, gamma) from an attacked model's ``true_trigger.safetensors``."""
    t = load_tensors(Path(model_dir) / TRUE_TRIGGER_FILE)
    if "r" not in t or "gamma" not in t:
        raise TerdError(f"{model_dir}: {TRUE_TRIGGER_FILE} must hold tensors 'r' and 'gamma'")
    return t["r"], t["gamma"]
